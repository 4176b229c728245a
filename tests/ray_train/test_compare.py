import json

import pytest

from ray_train.compare import main, rows


def _run(tmp_path, name, method, recall10, cold):
    d = tmp_path / name
    d.mkdir()
    metrics = {
        "recall@10": recall10, "ndcg@10": recall10 / 2,
        "by_bucket": {"head": {"recall@10": 0.5}, "tail": {"recall@10": 0.1}, "cold": {"recall@10": cold}},
        "mostpop": {"recall@10": 0.25, "ndcg@10": 0.125, "by_bucket": {"head": {"recall@10": 0.6}}},
    }
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "config.json").write_text(json.dumps({"ssl": {"method": method}}))
    return str(d)


def test_side_by_side_table(tmp_path, capsys):
    a = _run(tmp_path, "base", "none", 0.3, None)
    b = _run(tmp_path, "ssl", "cfm", 0.35, 0.02)
    out = main([a, b])
    lines = out.splitlines()
    assert "base (none)" in lines[0] and "ssl (cfm)" in lines[0] and "MostPop" in lines[0]
    recall = next(line for line in lines if line.startswith("recall@10")).split()
    assert recall[1:] == ["0.3000", "0.3500", "0.2500"]
    cold = next(line for line in lines if line.startswith("cold recall@10")).split()
    assert cold[2:] == ["-", "0.0200", "-"]
    assert rows({"recall@50": 0.1, "counts": {"users": 3}}) == {"recall@50": 0.1}


def test_missing_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an evaluated run"):
        main([str(tmp_path)])
