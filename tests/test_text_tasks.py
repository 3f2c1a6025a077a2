"""Text towers, text queries and zero-shot classification.

Parity: cbir's class text embeddings equal open_clip's own `build_zero_shot_classifier` on the same
random-weight model and prompts, and the transformers path equals `SiglipModel.get_text_features`.
Tokenizers: open_clip's CLIP tokenizer ships with open_clip; the Hugging Face ones (BiomedBERT,
SigLIP) cannot be had offline, so these tests write a tiny word-level vocabulary and save it with
transformers' own `PreTrainedTokenizerFast` (the class AutoTokenizer loads it back as).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cbir.encoders.base import EncoderError
from cbir.encoders.text import build_text_tower
from cbir.evaluate.text import (
    cached_class_embeddings,
    class_embeddings,
    class_prompts,
    prompts_key,
    text_retrieval,
    zero_shot,
)
from cbir.job.checks import ConfigError
from tests.conftest import compose, run_cbir

CLASSES = ["CT/abd/normal", "MR/knee/meniscal_abnormality", "XR/chest/Pleural Effusion"]
TEMPLATES = ["a {modality} image of the {anatomy} showing {finding}", "{modality} of the {anatomy}: {finding}"]
NAMES = {"XR": "X-ray", "MR": "MRI"}
TINY_SIGLIP = [
    "encoder.text.model_config.hidden_size=32",
    "encoder.text.model_config.intermediate_size=64",
    "encoder.text.model_config.num_hidden_layers=2",
    "encoder.text.model_config.num_attention_heads=2",
]


def save_tiny_tokenizer(folder, words=()) -> str:
    """A word-level tokenizer over the prompts' words, saved as transformers saves any tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1}
    base = " ".join(p for ps in class_prompts(CLASSES, TEMPLATES, NAMES) for p in ps) + " " + " ".join(words)
    for word in base.replace(":", " : ").replace(",", " , ").split():
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory):
    """paths.tokenizers_dir with a tiny tokenizer for each encoder whose tokenizer is on the hub."""
    root = tmp_path_factory.mktemp("tokenizers")
    for name in ("biomedclip", "medsiglip"):
        save_tiny_tokenizer(root / name, words=["X-ray", "CT", "MRI", "ultrasound", "radiology", "image"])
    return root


def test_prompts_fill_modality_anatomy_and_finding():
    prompts = class_prompts(CLASSES, TEMPLATES, NAMES)
    assert prompts[2] == ["a X-ray image of the chest showing Pleural Effusion", "X-ray of the chest: Pleural Effusion"]
    assert prompts[0][1] == "CT of the abd: normal"  # no name given: the code itself


def test_open_clip_class_weights_equal_open_clips_zero_shot_classifier(tmp_path):
    import open_clip
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    weights = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    cfg = compose("encoder=clip", "encoder.model_name=ViT-B-32", "encoder.dim=512", f"encoder.weights={weights}")
    tower = build_text_tower(cfg.encoder, seed=1)
    ours = class_embeddings(tower, class_prompts(CLASSES, TEMPLATES, NAMES))
    templates = [lambda c, t=t: class_prompts([c], [t], NAMES)[0][0] for t in TEMPLATES]
    theirs = build_zero_shot_classifier(
        model, open_clip.get_tokenizer("ViT-B-32"), CLASSES, templates, num_classes_per_batch=2
    )
    np.testing.assert_allclose(ours, theirs.T.numpy(), rtol=0, atol=2e-6)
    assert tower.identity()["weights"] == str(weights.resolve())


def test_transformers_text_tower_equals_get_text_features(tmp_path, tokenizers_dir):
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, SiglipConfig, SiglipModel

    torch.manual_seed(0)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    model = SiglipModel(
        SiglipConfig(
            text_config={**small, "vocab_size": 32000, "max_position_embeddings": 64},
            vision_config={**small, "image_size": 28, "patch_size": 14},
        )
    ).eval()
    weights = tmp_path / "siglip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    cfg = compose(
        "encoder=medsiglip", f"encoder.weights={weights}", *TINY_SIGLIP, f"paths.tokenizers_dir={tokenizers_dir}"
    )
    tower = build_text_tower(cfg.encoder, seed=1, tokenizers_dir=cfg.paths.tokenizers_dir)
    texts = [p for ps in class_prompts(CLASSES, TEMPLATES, NAMES) for p in ps]
    ids = AutoTokenizer.from_pretrained(tokenizers_dir / "medsiglip")(
        texts, padding="max_length", max_length=64, return_tensors="pt"
    )["input_ids"]
    with torch.inference_mode():
        theirs = model.get_text_features(input_ids=ids)
    theirs = getattr(theirs, "pooler_output", theirs)
    np.testing.assert_allclose(tower.encode(texts).numpy(), theirs.numpy(), rtol=0, atol=1e-5)


def test_biomedclip_text_tower_is_pubmedbert_with_its_projection(tokenizers_dir):
    """Built offline from the config (the hub's BERT config is unreachable), CLS of the last hidden
    state through the MLP projection to the image tower's 512 dimensions."""
    cfg = compose("encoder=biomedclip", "encoder.pretrained=false")
    tower = build_text_tower(cfg.encoder, seed=1, tokenizers_dir=str(tokenizers_dir))
    assert type(tower.model.transformer).__name__ == "BertModel" and tower.model.transformer.pooler is None
    assert tower.tokenize(["CT of the abd"]).shape == (1, 256)  # padded to its context length
    out = tower.encode(["CT of the abd: normal", "X-ray of the chest: Pleural Effusion"])
    assert out.shape == (2, 512) and torch.isfinite(out).all()


def test_random_text_tower_depends_on_the_seed_only(tokenizers_dir):
    cfg = compose("encoder=medsiglip", "encoder.pretrained=false", *TINY_SIGLIP)
    a = build_text_tower(cfg.encoder, seed=3, tokenizers_dir=str(tokenizers_dir)).encode(["CT of the abd"])
    torch.rand(100)  # whatever ran before
    b = build_text_tower(cfg.encoder, seed=3, tokenizers_dir=str(tokenizers_dir)).encode(["CT of the abd"])
    c = build_text_tower(cfg.encoder, seed=4, tokenizers_dir=str(tokenizers_dir)).encode(["CT of the abd"])
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_missing_tokenizer_offline_is_one_clear_error(tmp_path):
    cfg = compose("encoder=medsiglip", "encoder.pretrained=false", *TINY_SIGLIP)
    with pytest.raises(EncoderError, match="paths.tokenizers_dir/medsiglip"):
        build_text_tower(cfg.encoder, seed=1, tokenizers_dir=str(tmp_path))
    with pytest.raises(EncoderError, match="no text tower"):
        build_text_tower(compose("encoder=dinov3").encoder, seed=1)


def test_class_text_embeddings_are_cached_by_tower_and_prompts(tmp_path, tokenizers_dir):
    cfg = compose("encoder=medsiglip", "encoder.pretrained=false", *TINY_SIGLIP)
    tower = build_text_tower(cfg.encoder, seed=1, tokenizers_dir=str(tokenizers_dir))
    prompts = class_prompts(CLASSES, TEMPLATES, NAMES)
    first, hit = cached_class_embeddings(tower, prompts, tmp_path)
    again, hit_again = cached_class_embeddings(tower, prompts, tmp_path)
    assert not hit and hit_again and np.array_equal(first, again)
    _, hit_other = cached_class_embeddings(tower, class_prompts(CLASSES, TEMPLATES[:1], NAMES), tmp_path)
    other_tower = build_text_tower(cfg.encoder, seed=2, tokenizers_dir=str(tokenizers_dir))
    _, hit_other_tower = cached_class_embeddings(other_tower, prompts, tmp_path)
    assert not hit_other and not hit_other_tower
    stored = tmp_path / "text" / f"{prompts_key(tower, prompts)}.npy"
    assert json.loads(stored.with_suffix(".json").read_text())["prompts"] == prompts
    np.save(stored, np.zeros((1, 2), dtype=np.float32))  # damaged: wrong shape
    recomputed, hit_damaged = cached_class_embeddings(tower, prompts, tmp_path)
    assert not hit_damaged and np.array_equal(recomputed, first)


# ---------------------------------------------------------------------------- the evaluations
def frame(labels) -> pd.DataFrame:
    parts = [label.split("/", 2) for label in labels]
    return pd.DataFrame({"label": labels, "modality": [p[0] for p in parts], "anatomy": [p[1] for p in parts]})


def test_text_retrieval_scores_each_class_query_with_modified_precision():
    import faiss

    # index: 3 rows of A, 2 of B, 1 of C; text vectors: A's points at A's rows, B's at A's rows (wrong)
    labels = ["CT/abd/normal"] * 3 + ["MR/knee/tear"] * 2 + ["XR/chest/Effusion"]
    table = frame(labels)
    basis = np.eye(3, dtype=np.float32)
    images = basis[[0, 0, 0, 1, 1, 2]] + np.linspace(0, 0.01, 6, dtype=np.float32)[:, None]
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(3)
    index.add(images)
    classes = ["CT/abd/normal", "MR/knee/tear", "XR/chest/Effusion", "US/thyroid/nodule"]
    texts = basis[[0, 0, 2, 1]]
    result = text_retrieval(table, classes, texts, index, np.arange(6), ns=[1, 3])
    m = result.metrics
    # A: P@1 = 1, P@3 = 3/3; B: 0 and 0 (its 2 rows are ranked after A's 3); C: 1 and 1 (n = min(3, 1));
    # the US class has no index row: excluded and counted
    assert m["micro/P_at_1"] == pytest.approx(2 / 3) and m["micro/P_at_3"] == pytest.approx(2 / 3)
    assert m["queries/total"] == 4 and m["queries/excluded"] == 1
    assert m["modality/MR/micro/P_at_1"] == 0 and m["modality/XR/micro/P_at_1"] == 1
    assert m["level/modality/micro/P_at_1"] == pytest.approx(2 / 3)


def test_zero_shot_classifies_by_cosine_to_the_class_prompts():
    labels = ["CT/abd/normal", "MR/knee/tear", "XR/chest/Effusion", "CT/abd/normal", "US/thyroid/nodule"]
    table = frame(labels)
    classes = ["CT/abd/normal", "MR/knee/tear", "XR/chest/Effusion"]
    texts = np.eye(3, dtype=np.float32)
    embeddings = np.array([[2, 0.1, 0], [0, 1, 0.2], [0.3, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=np.float32)
    result, excluded = zero_shot(table, embeddings, np.arange(5), classes, texts, temperature=100.0)
    assert excluded == 1  # its class is not among the classes
    assert result.metrics["accuracy"] == pytest.approx(3 / 4)  # row 3 (CT) looks like MR
    assert result.per_class.set_index("class").loc["CT/abd/normal", "most_confused_with"] == "MR/knee/tear"
    assert result.metrics["micro_roc_auc"] > 0.5


# ---------------------------------------------------------------------------- configuration and runs
def test_task_all_adds_the_text_tasks_and_a_text_task_needs_a_text_tower():
    from cbir.evaluate import tasks

    cfg = compose("task=all", "encoder=clip")
    assert {"text_retrieval", "zero_shot"} <= set(cfg.task.evaluations) and cfg.task.text.templates
    tasks.check_config(cfg)
    tasks.check_config(compose("task=all", "encoder=baseline"))  # skipped at run time, not an error
    with pytest.raises(ConfigError, match="no text tower"):
        tasks.check_config(compose("task=zero_shot", "encoder=baseline"))
    with pytest.raises(ConfigError, match="unknown field"):
        tasks.check_config(compose("task=text_retrieval", "encoder=clip", "task.text.templates=['{organ}']"))


@pytest.mark.slow
def test_text_task_without_text_tower_fails_before_any_work(tmp_path):
    proc = run_cbir(tmp_path, "task=text_retrieval", "encoder=baseline", "debug=smoke", check=False)
    assert proc.returncode == 2 and "no text tower" in proc.stderr + proc.stdout
    assert not (tmp_path / "data").exists()  # the synthetic dataset was not even generated


@pytest.mark.slow
def test_sweep_runs_image_and_text_evaluations_side_by_side(tmp_path, tokenizers_dir):
    """The user's sweep, with the real architectures at a 64-px input (random weights): one text-less
    encoder (skipped, saying so), two with text towers; the report puts them in one table."""
    import mlflow

    run_cbir(
        tmp_path,
        "-m",
        "encoder=biomedclip,medsiglip,dinov3",
        "task=all",
        "++encoder.pretrained=false",
        "++encoder.input_size=64",
        "debug=smoke",
        "task.probe.max_epochs=3",
        "task.knn.k_max=5",
        f"paths.tokenizers_dir={tokenizers_dir}",
        timeout=3000,
    )
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'FINISHED'")
    runs = runs[runs["tags.encoder"].notna()].set_index("tags.encoder")
    assert set(runs.index) == {"biomedclip", "medsiglip", "dinov3"}
    for name in ("biomedclip", "medsiglip"):
        for metric in ("micro/P_at_1", "knn/accuracy", "probe/accuracy", "zero_shot/accuracy", "text/micro/P_at_1"):
            assert np.isfinite(runs.loc[name, f"metrics.{metric}"]), (name, metric)
    assert np.isfinite(runs.loc["dinov3", "metrics.knn/accuracy"])
    assert pd.isna(runs.loc["dinov3"].get("metrics.zero_shot/accuracy"))
    assert runs.loc["dinov3", "tags.text_tasks"] == "skipped: no text tower"
    report = run_cbir(tmp_path, "report.output_dir=report", module="cbir.report")
    zero_shot_table = pd.read_csv(tmp_path / "report" / "zero_shot.csv")
    assert set(zero_shot_table["encoder"]) == {"biomedclip", "medsiglip"}, report.stdout[-2000:]
    assert set(pd.read_csv(tmp_path / "report" / "knn_classification.csv")["encoder"]) == set(runs.index)


# ---------------------------------------------------------------------------- cbir.search search.text
CLIP_B32 = ["encoder=clip", "encoder.model_name=ViT-B-32", "encoder.dim=512", "encoder.pretrained=false"]
ONE_TEMPLATE = "task.text.templates=['{modality} of the {anatomy}: {finding}']"


@pytest.mark.slow
def test_free_text_search_on_a_saved_index_uses_the_runs_text_tower(tmp_path, shared_data_dir):
    import faiss

    run_cbir(
        tmp_path,
        "debug=smoke",
        *CLIP_B32,
        "task=text_retrieval",
        ONE_TEMPLATE,
        "hydra.run.dir=text_job",
        f"paths.data_dir={shared_data_dir}",
    )  # fills the class text cache with the run's text tower
    run_cbir(
        tmp_path, "debug=smoke", *CLIP_B32, "index.save=true", "hydra.run.dir=job", f"paths.data_dir={shared_data_dir}"
    )
    prompts = pd.read_csv(tmp_path / "text_job" / "text_prompts.csv")
    label, prompt = prompts.iloc[0]["class"], prompts.iloc[0]["prompt"]
    proc = run_cbir(
        tmp_path,
        "search.index_dir=job/index",
        f"search.text='{prompt}'",
        "search.k=5",
        "search.output=found.csv",
        "search.gallery=found.png",
        module="cbir.search",
    )
    assert "similarity" in proc.stdout and (tmp_path / "found.png").is_file()
    found = pd.read_csv(tmp_path / "found.csv").sort_values("rank")
    # the run's own class text embedding of that prompt (its cache), searched in the saved index
    (cached,) = [p for p in (tmp_path / ".cache" / "cbir" / "text").glob("*.npy")]
    vector = np.load(cached, allow_pickle=False)[list(prompts["class"]).index(label)][None]
    scores, rows = faiss.read_index(str(tmp_path / "job" / "index" / "index.faiss")).search(vector, 5)
    assert list(found["index_row"]) == list(rows[0])
    np.testing.assert_allclose(found["similarity"], scores[0], atol=1e-4)


@pytest.mark.slow
def test_free_text_search_on_an_index_without_text_tower_is_a_clear_error(tmp_path, shared_data_dir):
    run_cbir(
        tmp_path,
        "debug=smoke",
        "encoder=baseline",
        "index.save=true",
        "hydra.run.dir=job",
        f"paths.data_dir={shared_data_dir}",
    )
    proc = run_cbir(
        tmp_path, "search.index_dir=job/index", "search.text='chest X-ray'", module="cbir.search", check=False
    )
    assert proc.returncode == 2 and "has no text tower" in proc.stdout + proc.stderr
