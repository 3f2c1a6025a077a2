"""Image encoders behind one interface (see `cbir.encoders.base.Encoder`)."""

from cbir.encoders.base import Encoder

__all__ = ["Encoder"]
