"""Text towers of the vision-language encoders, for text queries and zero-shot classification.

An encoder config with a `text` block has a text tower; it is built only when a text evaluation
asks for it (`build_text_tower(cfg.encoder, seed)`), from the same weights as the image tower:

- `library: open_clip` (clip, bmc_clip, biomedclip): the text half of the open_clip model
  (`_build_text_tower` for CLIP-style towers, `HFTextEncoder` for Hugging Face text models such
  as BiomedCLIP's PubMedBERT, built from the config given here since the hub config is not
  reachable offline). Tokenizer: open_clip's own (CLIP BPE, ships with open_clip) or the HF
  tokenizer the model names. Embedding: `encode_text` before L2-normalising.
- `library: transformers` (medsiglip): `<model_class>` (SiglipTextModel); embedding =
  `pooler_output` (= SiglipModel.get_text_features); tokenizer padded as the model was trained.

Tokenizers come from the hub cache, a local folder (`text.tokenizer`), or
`paths.tokenizers_dir/<encoder name>` (air-gapped machines: `save_pretrained` them there once).
Random weights (`pretrained=false`) are drawn from a generator seeded by `seed` alone, so the
text tower is the same whatever was built before it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cbir.encoders.base import EncoderError, weights_identity
from cbir.encoders.hub import (
    hub_file,
    load_into,
    missing_weights_error,
    prepare_hub_access,
    read_state_dict,
    strip_prefix,
)


def has_text_tower(encoder_cfg: DictConfig) -> bool:
    return encoder_cfg.get("text") is not None


class TextTower:
    """Texts -> (T, dim) float32 embeddings (not normalised), and what determines them."""

    def __init__(self, name: str, model: torch.nn.Module, tokenize, identity: dict[str, Any]) -> None:
        self.name, self.model, self.tokenize, self._identity = name, model.eval(), tokenize, identity

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        parts = [
            self.model_output(self.tokenize(list(texts[i : i + batch_size]))) for i in range(0, len(texts), batch_size)
        ]
        return torch.cat(parts).float()

    def model_output(self, tokens) -> torch.Tensor:
        out = self.model(tokens)
        return out.pooler_output if hasattr(out, "pooler_output") else out

    def identity(self) -> dict[str, Any]:
        return self._identity

    def cache_key(self) -> str:
        return hashlib.sha256(json.dumps(self._identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenizer_identity(tokenizer) -> dict[str, Any]:
    """A tokenizer by its class and a hash of its vocabulary (a local folder and a hub copy of the
    same tokenizer are the same; a different vocabulary is not)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else getattr(tokenizer, "encoder", {})
    blob = json.dumps(sorted(vocab.items()), default=str).encode()
    return {"tokenizer": type(tokenizer).__name__, "vocab_sha256": hashlib.sha256(blob).hexdigest()[:16]}


def tokenizer_source(encoder_cfg: DictConfig, tokenizers_dir: str | None, default: str) -> str:
    text = encoder_cfg.text
    if text.get("tokenizer"):
        return str(text.tokenizer)
    if tokenizers_dir and (Path(tokenizers_dir) / str(encoder_cfg.name)).is_dir():
        return str(Path(tokenizers_dir) / str(encoder_cfg.name))
    return default


def load_hf_tokenizer(encoder: str, source: str):
    from transformers import AutoTokenizer

    prepare_hub_access()
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as e:  # offline, missing files, gated: the same fixes
        raise EncoderError(
            f"encoder {encoder}: its text tokenizer '{source}' is not in the local cache and the model hub is not "
            f"reachable ({type(e).__name__}). Fix: run once online to fill the Hugging Face cache, or save the "
            f"tokenizer (AutoTokenizer.from_pretrained(...).save_pretrained(dir)) into "
            f"paths.tokenizers_dir/{encoder} or pass encoder.text.tokenizer=<dir>"
        ) from e


def build_text_tower(encoder_cfg: DictConfig, seed: int, tokenizers_dir: str | None = None) -> TextTower:
    if not has_text_tower(encoder_cfg):
        raise EncoderError(
            f"encoder {encoder_cfg.name}: has no text tower (text queries and zero-shot need one; "
            "encoders with one: the configs with a `text` block)"
        )
    library = encoder_cfg.text.get("library")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if library == "open_clip":
            return _open_clip_tower(encoder_cfg, seed, tokenizers_dir)
        if library == "transformers":
            return _transformers_tower(encoder_cfg, seed, tokenizers_dir)
    raise EncoderError(f"encoder.text.library={library}: use open_clip or transformers")


def _weights_id(encoder_cfg: DictConfig, seed: int) -> dict:
    identity = weights_identity(encoder_cfg.get("weights"), bool(encoder_cfg.get("pretrained", True)))
    if identity["weights"] == "random-init":
        identity["seed"] = int(seed)
    elif identity["weights"] == "pretrained":
        identity.update(hub_id=encoder_cfg.get("hub_id"), revision=encoder_cfg.get("revision"))
    return identity


def _open_clip_tower(encoder_cfg: DictConfig, seed: int, tokenizers_dir: str | None) -> TextTower:
    import open_clip

    name, text = str(encoder_cfg.name), OmegaConf.to_container(encoder_cfg.text, resolve=True)
    model_name = encoder_cfg.get("model_name")
    arch = open_clip.get_model_config(model_name) if model_name else {}
    embed_dim = int(encoder_cfg.get("embed_dim") or arch["embed_dim"])
    text_cfg = {**arch.get("text_cfg", {}), **text.get("text_cfg", {})}
    quick_gelu = bool(
        arch.get("quick_gelu", False) if encoder_cfg.get("quick_gelu") is None else encoder_cfg.quick_gelu
    )
    if "hf_model_name" in text_cfg:  # a Hugging Face text model (BiomedCLIP): its config is given here
        import transformers
        from open_clip.hf_model import HFTextEncoder
        from open_clip.tokenizer import HFTokenizer

        hf_config = dict(text["hf_config"])
        config = transformers.CONFIG_MAPPING[hf_config.pop("model_type")](**hf_config)
        model = HFTextEncoder(
            text_cfg["hf_model_name"],
            embed_dim,
            config=config,
            pooler_type=text_cfg.get("hf_pooler_type"),
            proj_type=text_cfg.get("hf_proj_type"),
            pretrained=False,
        )
        if text_cfg.get("hf_pooler_type") != "cls_pooler" and getattr(model.transformer, "pooler", None) is not None:
            model.transformer.pooler = None  # as open_clip builds it (add_pooling_layer=False): not in checkpoints
        source = tokenizer_source(
            encoder_cfg, tokenizers_dir, text_cfg.get("hf_tokenizer_name", text_cfg["hf_model_name"])
        )
        load_hf_tokenizer(name, source)  # a clear error when it cannot be had
        tokenizer = HFTokenizer(source, context_length=int(text_cfg.get("context_length", 77)))
        tok_id = {**tokenizer_identity(tokenizer.tokenizer), "context_length": tokenizer.context_length}
        prefix = "text."
    else:
        model = open_clip.model._build_text_tower(embed_dim, open_clip.model.CLIPTextCfg(**text_cfg), quick_gelu)
        tokenizer = open_clip.get_tokenizer(model_name or "ViT-B-32", context_length=text_cfg.get("context_length"))
        tok_id = {**tokenizer_identity(tokenizer), "context_length": tokenizer.context_length}
        prefix = ""
    weights_id = _weights_id(encoder_cfg, seed)
    if weights_id["weights"] != "random-init":
        path = encoder_cfg.get("weights") or hub_file(
            name, encoder_cfg.hub_id, list(encoder_cfg.hub_files), encoder_cfg.get("revision")
        )
        state_dict = read_state_dict(path, name)
        if prefix:
            state_dict = strip_prefix(state_dict, prefix, keep_others=False)
        else:  # CLIP: the text weights are the top-level keys that are not the image tower's
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("visual.", "logit_"))}
        load_into(model, state_dict, name, f"{path} (text tower)")
    identity = {
        "library": "open_clip",
        "model_name": model_name,
        "embed_dim": embed_dim,
        "text_cfg": text_cfg,
        "quick_gelu": quick_gelu,
        **weights_id,
        **tok_id,
    }
    return TextTower(name, model, tokenizer, identity)


def _transformers_tower(encoder_cfg: DictConfig, seed: int, tokenizers_dir: str | None) -> TextTower:
    import transformers

    name, text = str(encoder_cfg.name), OmegaConf.to_container(encoder_cfg.text, resolve=True)
    cls = getattr(transformers, text["model_class"], None)
    if cls is None:
        raise EncoderError(f"encoder {name}: transformers has no model class '{text['model_class']}'")
    model_config = dict(text.get("model_config") or {})
    weights_id = _weights_id(encoder_cfg, seed)
    if weights_id["weights"] == "pretrained":
        prepare_hub_access()
        try:
            model = cls.from_pretrained(encoder_cfg.hub_id, revision=encoder_cfg.get("revision"))
        except Exception as e:
            raise missing_weights_error(name, f"'{encoder_cfg.hub_id}' (transformers {cls.__name__})", e) from e
        weights_id["commit"] = getattr(model.config, "_commit_hash", None)
    else:
        model = cls(cls.config_class(**model_config))
        if weights_id["weights"] != "random-init":  # a local file with the full model's layout
            state_dict = strip_prefix(read_state_dict(encoder_cfg.weights, name), "text_model.")
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("vision_model.", "logit_"))}
            load_into(model, state_dict, name, f"{encoder_cfg.weights} (text tower)")
    tokenizer = load_hf_tokenizer(name, tokenizer_source(encoder_cfg, tokenizers_dir, str(encoder_cfg.hub_id)))
    padding, max_length = text.get("padding", "max_length"), int(text.get("max_length", 64))

    def tokenize(texts: list[str]) -> torch.Tensor:
        # input ids only, as SiglipProcessor gives them: the model was trained attending to the padding
        return tokenizer(texts, padding=padding, max_length=max_length, truncation=True, return_tensors="pt")[
            "input_ids"
        ]

    identity = {
        "library": "transformers",
        "model_class": text["model_class"],
        "model_config": model_config,
        **weights_id,
        **tokenizer_identity(tokenizer),
        "padding": padding,
        "max_length": max_length,
    }
    return TextTower(name, model, tokenize, identity)
