"""The layout's promises: packages by stage with imports flowing one way, every evaluation behind
the same interface, and one job passing through plan → embed → evaluate → record once, in order,
with nothing but the record step writing to MLflow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import compose

CBIR = Path(__file__).resolve().parents[1] / "cbir"
# the stages, lowest first: a module may import its own package and the ones before it
STAGES = ["common", "data", "encoders", "extract", "evaluate", "tracking", "report", "job", "study"]
LEAVES = {"cbir", "cbir.study.format"}  # from any stage: CONFIG_DIR; the study's file format (imports only cbir.common)
# the job saves its index in the format `cbir.search` reads and logs it as the model `cbir.serving` serves
ALLOWED = {("job", "cbir.search"), ("job", "cbir.serving")}
# writes to an MLflow store (Tracker, fluent API or client)
WRITES = {
    "log_metrics",
    "log_metric",
    "log_params",
    "log_param",
    "set_tags",
    "set_tag",
    "log_artifact",
    "log_artifacts",
    "log_table",
    "log_dict",
    "log_input",
    "log_batch",
    "log_dataset",
    "create_run",
    "start_run",
    "log_retriever",
}


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cbir":
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "cbir" else [node.module]
            found += [(node.lineno, name) for name in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "cbir"]
    return found


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (CBIR / parts[1]).is_dir()) else None


def test_imports_flow_one_way_between_the_stages():
    wrong = []
    for path in sorted(CBIR.rglob("*.py")):
        package = path.relative_to(CBIR).parts[0]
        if package not in STAGES:
            continue  # the commands (cbir/*.py, bench/) sit on top and may import any stage
        for line, module in imports(path):
            if module in LEAVES or any(module.startswith(f"{leaf}.") for leaf in LEAVES - {"cbir"}):
                continue
            if module.startswith("cbir.CONFIG_DIR"):
                continue
            other = stage_of(module)
            if other is None:  # a top-level command module
                if (package, module.split(".")[0] + "." + module.split(".")[1]) not in ALLOWED:
                    wrong.append(f"{path.relative_to(CBIR)}:{line} imports the command module {module}")
            elif other != package and STAGES.index(other) > STAGES.index(package):
                wrong.append(f"{path.relative_to(CBIR)}:{line} ({package}) imports {module} ({other}, a later stage)")
    assert not wrong, "\n".join(wrong)


def test_the_stage_scan_sees_a_backward_import(tmp_path):
    """The scan above reads function-level imports too (most of cbir's later-stage imports are there)."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from cbir.job import record\n")
    assert imports(module) == [(2, "cbir.job")] and stage_of("cbir.job") == "job"


def test_no_stage_before_the_record_step_writes_to_mlflow():
    """Data, encoders, extraction, the evaluations and the job's plan and embed steps never log:
    they return outcomes, and cbir/job/record.py logs them."""
    quiet = [
        p
        for p in CBIR.rglob("*.py")
        if p.relative_to(CBIR).parts[0] in ("common", "data", "encoders", "extract", "evaluate")
    ]
    quiet += [CBIR / "job" / name for name in ("plan.py", "embed.py", "checks.py", "inputs.py", "finish.py")]
    quiet += list((CBIR / "job" / "evaluations").glob("*.py"))
    wrong = []
    for path in quiet:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in WRITES:
                wrong.append(f"{path.relative_to(CBIR)}:{node.lineno} calls .{node.func.attr}(...)")
    assert not wrong, "\n".join(wrong)


def test_every_evaluation_has_the_interface_and_every_task_is_planned():
    from cbir.evaluate import tasks
    from cbir.job import evaluations

    for evaluation in evaluations.EVALUATIONS:
        assert callable(evaluation.wanted) and callable(evaluation.evaluate), evaluation.__name__
    by_task = {
        "retrieval": {"retrieval", "index_outputs", "audit"},  # eval.gallery=true by default
        "knn_classification": {"knn", "audit"},
        "linear_probe": {"probe", "audit"},
        "text_retrieval": {"text_queries", "audit"},
        "zero_shot": {"text_queries", "audit"},
        "all": {"retrieval", "index_outputs", "knn", "probe", "text_queries", "audit"},
    }
    assert set(by_task) == {p.stem for p in (CBIR.parent / "conf" / "task").glob("*.yaml")}
    for task, expected in by_task.items():
        cfg = compose(f"task={task}")
        planned = {m.__name__.rsplit(".", 1)[1] for m in evaluations.planned(cfg)}
        assert planned == expected, (task, planned)
        assert set(tasks.evaluations(cfg)) <= set(tasks.EVALUATIONS)
    extras = compose("eval.gallery=true", "eval.saturation=[1,all]", "dataset.labels=multi")
    assert {m.__name__.rsplit(".", 1)[1] for m in evaluations.planned(extras)} == {
        "retrieval",
        "index_outputs",
        "multilabel",
        "saturation",
        "audit",
    }


@pytest.mark.slow
def test_one_job_passes_plan_embed_evaluate_record_once_in_order(tmp_path, shared_data_dir, monkeypatch):
    """Every check before the first image is embedded, every evaluation before the first write to
    MLflow, each evaluation once; the run then holds what each evaluation returned."""
    from mlflow.tracking import MlflowClient

    from cbir.extract import single
    from cbir.job import checks, evaluations
    from cbir.run import run
    from cbir.tracking import runs

    events: list[str] = []

    def spy(owner, name, label):
        original = getattr(owner, name)

        def called(*args, **kwargs):
            events.append(label)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, called)

    spy(checks, "validate_config", "check")
    spy(checks, "settle_index_params", "check")
    spy(single, "extract_embeddings", "embed")
    for evaluation in evaluations.EVALUATIONS:
        spy(evaluation, "evaluate", f"evaluate {evaluation.__name__.rsplit('.', 1)[1]}")
    for write in ("log_metrics", "log_params", "set_tags", "log_artifact"):
        spy(runs.Tracker, write, "record")

    monkeypatch.chdir(tmp_path)
    cfg = compose(
        "dataset=synthetic_small",
        "encoder=random",
        "task=all",
        "eval.gallery=true",
        f"paths.data_dir={shared_data_dir}",
        f"paths.cache_dir={tmp_path}/cache",
        f"tracking.dir={tmp_path}/mlruns",
    )
    result = run(cfg)

    first_record = events.index("record")
    assert events.index("embed") > max(i for i, e in enumerate(events) if e == "check")
    assert events.count("embed") == 1
    evaluated = [e for e in events if e.startswith("evaluate")]
    assert evaluated == [
        "evaluate retrieval",
        "evaluate index_outputs",
        "evaluate knn",
        "evaluate probe",
        "evaluate text_queries",
        "evaluate audit",
    ]
    assert first_record > max(i for i, e in enumerate(events) if e.startswith("evaluate"))
    tracker = runs.Tracker.from_config(cfg)
    (logged,) = MlflowClient(tracker.uri).search_runs([tracker.experiment_id()])
    assert logged.info.status == "FINISHED"
    assert logged.data.metrics["micro/P_at_1"] == pytest.approx(result.metrics["micro/P_at_1"])
    assert {"knn/accuracy", "probe/accuracy", "audit/content/queries", "data/skipped"} <= set(logged.data.metrics)
    assert logged.data.tags["text_tasks"] == "skipped: no text tower"
