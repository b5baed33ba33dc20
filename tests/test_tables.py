"""core/tables: the one set of table writers (Markdown, CSV, HTML, float formatting).

These writers replaced per-stage copies (evaluation/table2, evaluation/run, cohort/table1,
vae/fidelity, tracking/compare); the expected strings below are byte-for-byte what the old copies
produced on the same frames, so every report file stays identical.
"""

import numpy as np
import pandas as pd

from hemexp.core.tables import fmt_floats, markdown_table, write_csv, write_html


def _mixed() -> pd.DataFrame:
    return pd.DataFrame({"method": ["2D-ice", "copy-baseline"], "n": [3, 4], "mae": [1.23456, np.nan],
                         "ok": [True, False]})


def _indexed() -> pd.DataFrame:
    t = pd.DataFrame({"Train (A, n=3)": ["1.0 [0.5-2.0]", "33%"], "Test (B, n=2)": ["2.0 [1.0-3.0]", "50%"]},
                     index=pd.Index(["Age", "Anticoagulant"], name="Characteristic"))
    return t


# Output of the old evaluation/table2.py::markdown_table on _mixed().
OLD_PLAIN = ("| method | n | mae | ok |\n|---|---|---|---|\n| 2D-ice | 3 | 1.23456 | True |\n"
             "| copy-baseline | 4 | nan | False |\n")
# Output of the old cohort/table1.py::to_markdown (and tracking/compare.py's Markdown) on _indexed().
OLD_INDEXED = ("| Characteristic | Train (A, n=3) | Test (B, n=2) |\n|---|---|---|\n"
               "| Age | 1.0 [0.5-2.0] | 2.0 [1.0-3.0] |\n| Anticoagulant | 33% | 50% |\n")
# Output of the old evaluation/run.py::fmt_floats + markdown_table on _mixed().
OLD_ROUNDED = ("| method | n | mae | ok |\n|---|---|---|---|\n| 2D-ice | 3 | 1.23 | True |\n"
               "| copy-baseline | 4 | - | False |\n")


def test_markdown_table_matches_the_old_writers():
    assert markdown_table(_mixed()) == OLD_PLAIN
    assert markdown_table(_indexed(), index=True) == OLD_INDEXED
    assert markdown_table(fmt_floats(_mixed())) == OLD_ROUNDED


def test_fmt_floats_leaves_non_float_columns_and_the_input_alone():
    frame = _mixed()
    out = fmt_floats(frame, digits=2)
    assert out["mae"].tolist() == ["1.2", "-"] and out["n"].tolist() == [3, 4]
    assert frame["mae"].dtype == float  # a copy, not an in-place edit


def test_write_csv_and_html_bytes(tmp_path):
    write_csv(_mixed(), tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text() == "method,n,mae,ok\n2D-ice,3,1.23456,True\ncopy-baseline,4,,False\n"
    write_csv(_indexed(), tmp_path / "i.csv", index=True)
    assert (tmp_path / "i.csv").read_text().splitlines()[0] == "Characteristic,\"Train (A, n=3)\",\"Test (B, n=2)\""
    f = pd.DataFrame({"x": [0.123456]}, index=pd.Index(["Train"], name="split"))
    write_csv(f, tmp_path / "f.csv", index=True, float_format="%.4f")
    assert (tmp_path / "f.csv").read_text() == "split,x\nTrain,0.1235\n"
    write_html(tmp_path / "t.html", "T <2>", [("", _mixed()), ("By flag", _mixed().head(1))], ["note & more", ""])
    page = (tmp_path / "t.html").read_text()
    assert page.startswith("<!DOCTYPE html><html><head><meta charset='utf-8'><title>T &lt;2&gt;</title>")
    assert "<h3>By flag</h3>" in page and "<pre>note &amp; more</pre>" in page and page.count("<pre>") == 1
    assert "<td>1.23</td>" in page and "<td>-</td>" in page and page.endswith("</body></html>\n")
