"""Multi-label relevance (`dataset.labels=multi`): `ml/` metrics ("shares a finding", mAP, nDCG,
R-precision) on retrieval's own neighbours, multilabel_metrics.json and per_finding.csv."""

from __future__ import annotations

import json

from cbir.evaluate import multilabel, per_query
from cbir.evaluate.outcome import Outcome
from cbir.job.evaluations import retrieval


def wanted(cfg) -> bool:
    return retrieval.wanted(cfg) and multilabel.labels_mode(cfg) == "multi"


def evaluate(job) -> Outcome:
    cfg, table, search = job.cfg, job.table, job.search
    result = multilabel.evaluate_search(table, search, cfg.eval.n)
    result.metrics.update(per_query.multilabel_intervals(result.per_query, table.iloc[search.setup.query_rows], cfg))
    job.out.mkdir(parents=True, exist_ok=True)
    files = {"multilabel_metrics": job.out / "multilabel_metrics.json", "per_finding": job.out / "per_finding.csv"}
    files["multilabel_metrics"].write_text(
        json.dumps(
            {"metrics": result.metrics, "queries": result.n_queries, "excluded_queries": result.n_excluded}, indent=1
        )
    )
    result.per_finding.to_csv(files["per_finding"], index=False)
    per_query.add_shown(files["multilabel_metrics"])
    title = f"{job.run_name}  (multi-label: shares a finding)"
    return Outcome(
        "multilabel",
        metrics=dict(result.metrics),
        files=files,
        tables=[(multilabel.summary_table(result, cfg.eval.n, title), 120)],  # 8 columns
    )
