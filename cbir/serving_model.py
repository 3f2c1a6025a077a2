"""The code of a served retriever (MLflow models-from-code).

`cbir.serving.log_retriever` logs this file as the model: MLflow copies it into the model folder
and runs it when the model is loaded, so the model folder holds no pickled Python object. It only
names cbir's installed class; the index, manifest and encoder config are data files read back
through cbir's checked loader (cbir.search.SavedIndex)."""

from mlflow.models import set_model

from cbir.serving import Retriever

set_model(Retriever())
