"""Bad input at the entry points (manifest, config, command line) never crashes, never passes silently
and never escapes: one message naming the patient / file / key and the problem, exit 2 (usage, config,
manifest) or 1 (one patient's input), no traceback (unless ``hemexp -v``), no partial output, and no
file written outside ``results_dir``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from workflow_helpers import default_config, manifest_config, write_config
from workflow_helpers import write_manifest as write_cohort

from hemexp.cli import main
from hemexp.cohort.manifest import IMAGE_COLUMNS, read_manifest
from hemexp.cohort.patients import workflow_patients
from hemexp.core.commands import exit_on_usage_error
from hemexp.core.config import ConfigError, check_workflow_config_files, load_config, validate_config
from hemexp.core.errors import ManifestError
from hemexp.core.ids import check_patient_id, normalise_patient_id, patient_id_problem

HEADER = ["patient_id", "site", "split", *IMAGE_COLUMNS, "onset_to_ct_h", "baseline_iph_ml", "anticoagulant",
          "antiplatelet", "age", "gcs", "sbp", "expansion", "he_prob"]


def _row(pid: str, split: str = "train", **over: str) -> dict[str, str]:
    row = {"patient_id": pid, "site": "A", "split": split, **{c: f"{pid}/{c}.nii.gz" for c in IMAGE_COLUMNS},
           "onset_to_ct_h": "2", "baseline_iph_ml": "12.5", "anticoagulant": "0", "antiplatelet": "1",
           "age": "71", "gcs": "14", "sbp": "180", "expansion": "0", "he_prob": ""}
    row.update(over)
    return row


def _table(folder: Path, rows: list[dict[str, str]], make_files: bool = True) -> Path:
    for r in rows:
        for c in IMAGE_COLUMNS:
            if make_files and r[c].strip():
                f = folder / r[c].strip()
                f.parent.mkdir(parents=True, exist_ok=True)
                if not f.exists():
                    f.write_bytes(b"x")
    path = folder / "manifest.tsv"
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def _text(folder: Path, text: str | bytes) -> Path:
    path = folder / "manifest.tsv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _lines(*rows: dict[str, str], header: list[str] = HEADER) -> str:
    return "\n".join(["\t".join(header), *("\t".join(r[c] for c in header) for r in rows)]) + "\n"


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err and 'File "' not in err, err
    return code, err


# ------------------------------------------------------------------------------------------- manifest
# name -> (write the manifest under a folder, substrings the message must hold)
MANIFEST_CASES = {
    "zero_bytes": (lambda d: _text(d, b""), ["manifest.tsv", "file is empty", "header line"]),
    "only_whitespace": (lambda d: _text(d, "\n \n\t\n"), ["manifest.tsv", "file is empty"]),
    "header_without_rows": (lambda d: _text(d, "\t".join(HEADER) + "\n"), ["no patient rows below the header"]),
    "repeated_column": (
        lambda d: _text(d, _lines(_row("P1") | {"age2": "70"}, header=[*HEADER, "age"]).replace("\tage2", "")),
        ["header: column 'age' appears 2 times", "keep one"]),
    "comma_separated": (lambda d: _text(d, ",".join(HEADER) + "\n" + ",".join(_row("P1").values()) + "\n"),
                        ["missing column(s): patient_id", "must be tab-separated"]),
    "not_utf8": (lambda d: _text(d, _lines(_row("P\xe91")).encode("latin-1")), ["line 2: not UTF-8", "save the"]),
    "row_with_extra_field": (lambda d: _text(d, _lines(_row("P1"), _row("P2", he_prob="0.5")).replace("P2\tA", "P2\tA\tX", 1)),
                             ["row 3: 19 tab-separated fields but the header has 18 columns"]),
    "unclosed_quote": (lambda d: _text(d, _lines(_row("P1", site='"A'))), ["not a tab-separated table", "'\"'"]),
    "missing_file": (lambda d: d / "nope.tsv", ["file not found", "nope.tsv"]),
    "folder_not_file": (lambda d: d, ["is a folder; give the manifest TSV file"]),
    "duplicate_after_nfkc": (lambda d: _table(d, [_row("A001"), _row("\uff21001", baseline_ct="B/ct.nii.gz",
                                                                        followup_ct="B/fu.nii.gz")]),
                             ["row 3 (patient A001), column patient_id: duplicate ID 'A001' (written 'Ａ001'",
                              "also in row(s) 2"]),
    "duplicate_after_strip": (lambda d: _table(d, [_row("P1"), _row(" P1 ", baseline_ct="Q/a.nii.gz",
                                                                    followup_ct="Q/b.nii.gz")]),
                              ["row 2 (patient P1), column patient_id: duplicate ID 'P1', also in row(s) 3"]),
    "non_ascii_id": (lambda d: _table(d, [_row("P\xe91", baseline_ct="x/a.nii.gz", followup_ct="x/b.nii.gz")]),
                     ["row 2 (patient Pé1), column patient_id: 'Pé1' contains 'é'", "ASCII letters"]),
    "help_looking_id": (lambda d: _table(d, [_row("--help", baseline_ct="x/a.nii.gz", followup_ct="x/b.nii.gz")]),
                        ["row 2 (patient --help), column patient_id: '--help' begins with '-'"]),
    "option_looking_id": (lambda d: _table(d, [_row("-rf", baseline_ct="x/a.nii.gz", followup_ct="x/b.nii.gz")]),
                          ["(patient -rf), column patient_id: '-rf' begins with '-'"]),
    "path_traversal_id": (lambda d: _table(d, [_row("../x", baseline_ct="x/a.nii.gz", followup_ct="x/b.nii.gz")]),
                          ["(patient ../x), column patient_id: '../x' contains './'"]),
    "id_with_space": (lambda d: _table(d, [_row("P 1", baseline_ct="x/a.nii.gz", followup_ct="x/b.nii.gz")]),
                      ["column patient_id: 'P 1' contains ' '"]),
    "id_too_long": (lambda d: _table(d, [_row("P" * 200, baseline_ct="x/a.nii.gz", followup_ct="x/b.nii.gz")]),
                    ["is 200 characters long (at most 128)"]),
    "ids_differ_in_case_only": (lambda d: _table(d, [_row("p1"), _row("P1")]),
                                ["row 3 (patient P1), column patient_id: 'P1' differs only in letter case",
                                 "row(s) 2"]),
    "same_ct_baseline_and_followup": (
        lambda d: _table(d, [_row("P1", followup_ct="P1/baseline_ct.nii.gz")]),
        ["row 2 (patient P1), columns baseline_ct and followup_ct: both name the file 'P1/baseline_ct.nii.gz'"]),
    "same_ct_spelled_differently": (
        lambda d: _table(d, [_row("P1", followup_ct="P1/../P1/./baseline_ct.nii.gz")]),
        ["row 2 (patient P1), columns baseline_ct and followup_ct: both name the file"]),
    "ct_of_another_patient": (
        lambda d: _table(d, [_row("P1"), _row("P2", baseline_ct="P1/followup_ct.nii.gz")]),
        ["row 3 (patient P2), column baseline_ct: 'P1/followup_ct.nii.gz' is also the followup_ct of row 2 "
         "(patient P1)"]),
    "mask_names_the_ct": (lambda d: _table(d, [_row("P1", baseline_iph="P1/baseline_ct.nii.gz")]),
                          ["(patient P1), column baseline_iph: names the CT file of column baseline_ct"]),
    "image_file_missing": (lambda d: _missing_file(d), ["row 3 (patient P2), column followup_ivh: file not found"]),
}


def _missing_file(folder: Path) -> Path:
    path = _table(folder, [_row("P1"), _row("P2")])
    (folder / "P2" / "followup_ivh.nii.gz").unlink()
    return path


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_bad_manifest_is_one_message(case, tmp_path, capsys):
    build, expected = MANIFEST_CASES[case]
    folder = tmp_path / "cohort"
    folder.mkdir()
    manifest = build(folder)
    out = tmp_path / "check" / "manifest_check.json"
    code, err = _run(["validate-manifest", manifest, "--out", out], capsys)
    assert code == 2, err
    assert err.startswith("hemexp validate-manifest: ")
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    assert not out.exists() and not out.parent.exists()  # no partial --out
    assert not list(tmp_path.rglob("*.tmp*"))


def test_manifest_ids_are_normalised_and_bom_is_not_part_of_the_header(tmp_path):
    rows = [_row("\uff30\uff11"), _row(" P2\t".strip() + " ", "test")]  # full-width 'P1', padded 'P2'
    path = _table(tmp_path, rows)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # Excel's "UTF-8 with BOM"
    df = read_manifest(path)
    assert list(df["patient_id"]) == ["P1", "P2"]
    assert normalise_patient_id(" \uff21\uff10\uff10\uff11 ") == "A001" and patient_id_problem("A001") is None
    assert check_patient_id("_a-1") == "_a-1"


def test_missing_image_files_do_not_stop_the_workflow_start(tmp_path):
    """The workflow's cohort does not require the raw files: the patient's own ingest fails on them."""
    manifest = _table(tmp_path, [_row("P1"), _row("P2", "test")])
    (tmp_path / "P1" / "followup_ct.nii.gz").unlink()
    cfg = manifest_config(manifest, tmp_path / "results")
    cohort = {p.patient_id: p for p in workflow_patients(cfg)}
    assert sorted(cohort) == ["P1", "P2"]
    present = cohort["P1"].raw_files(present_only=True)
    assert len(present) == 5 and not any(f.endswith("P1/followup_ct.nii.gz") for f in present)
    assert len(cohort["P1"].raw_files()) == 6
    with pytest.raises(ManifestError, match="row 2 \\(patient P1\\), column followup_ct: file not found"):
        read_manifest(manifest)  # what rule validate_manifest reports


@pytest.mark.parametrize(("rows", "expected"), [
    ([_row("T1", "test")], "no patient has split 'train' (1 test patient(s))"),
    ([], "no patient rows below the header"),
])
def test_workflow_start_empty_cohort_is_one_line(rows, expected, tmp_path, capsys):
    manifest = _text(tmp_path, _lines(*rows)) if not rows else _table(tmp_path, rows)
    cfg = manifest_config(manifest, tmp_path / "results")
    with pytest.raises(SystemExit) as stop, exit_on_usage_error("hemexp workflow"):
        workflow_patients(cfg)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and expected in err and err.startswith("hemexp workflow: manifest manifest.tsv")
    assert "Traceback" not in err


def test_test_only_cohort_is_allowed_with_frozen_models_and_a_template(tmp_path):
    cfg = manifest_config(_table(tmp_path, [_row("T1", "test")]), tmp_path / "results", freeze_models=True)
    cfg["preprocess"]["template"] = str(tmp_path / "template.nii.gz")
    assert [p.patient_id for p in workflow_patients(cfg)] == ["T1"]


def test_workflow_start_zero_byte_manifest_via_snakemake(tmp_path):
    """The one real `snakemake -n`: a 0-byte manifest stops the workflow with one message, exit 2."""
    from workflow_helpers import snakemake

    (tmp_path / "raw").mkdir()
    manifest = _text(tmp_path / "raw", b"")
    configfile = write_config(tmp_path / "cfg.yaml", manifest_config(manifest, tmp_path / "results"))
    out = snakemake(tmp_path, configfile, "-n", "--cores", "1", "--keep-going", check=False, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "hemexp workflow: manifest manifest.tsv: 1 problem(s)\n  - file is empty" in out.stderr
    assert "Traceback" not in out.stderr and 'File "' not in out.stderr and "EmptyDataError" not in out.stderr
    assert not (tmp_path / "results").exists()


# --------------------------------------------------------------------------------------------- config
def _config_file(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


CONFIG_FILE_CASES = {
    "missing": (None, ["nope.yaml: file not found"]),
    "folder": ("<folder>", ["is a folder, not a YAML file"]),
    "broken_yaml": ("results_dir: results\ncohort: [1, 2\nseed: 0\n", ["bad.yaml: YAML error at line", "column"]),
    "bad_indent": ("a:\n  b: 1\n c: 2\n", ["bad.yaml: YAML error at line 3"]),
    "tab_indent": ("a:\n\tb: 1\n", ["bad.yaml: YAML error at line 2"]),
    "list_at_top": ("- 1\n- 2\n", ["top level must be a mapping", "got a list"]),
    "scalar_at_top": ("just text\n", ["top level must be a mapping", "'just text'"]),
    "empty_file": ("", ["bad.yaml: the file is empty"]),
    "only_comments": ("# nothing here\n", ["bad.yaml: the file is empty"]),
    "repeated_key": (None, ["key 'seed' appears twice in one mapping", "remove one"]),
    "not_utf8": (b"results_dir: r\xe9sultats\n", ["not UTF-8 text"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_FILE_CASES))
def test_unreadable_config_file_is_one_line(case, tmp_path, capsys):
    text, expected = CONFIG_FILE_CASES[case]
    if case == "missing":
        path = tmp_path / "nope.yaml"
    elif case == "folder":
        path = tmp_path / "cfgdir"
        path.mkdir()
    elif case == "repeated_key":
        path = _config_file(tmp_path, yaml.safe_dump(default_config()) + "seed: 1\n")
    else:
        path = _config_file(tmp_path, text)
    code, err = _run(["validate-config", path], capsys)
    assert code == 2 and err.count("\n") == 1, err  # ONE line
    for t in expected:
        assert t in err, f"{t!r} not in {err!r}"
    # every command's --config, and the workflow's start check, say the same
    code, err2 = _run(["cohort-table", tmp_path / "m.tsv", "--csv", tmp_path / "t.csv", "--md", tmp_path / "t.md",
                       "--config", path], capsys)
    assert code == 2 and err2.split(": ", 1)[1] == err.split(": ", 1)[1]
    assert not (tmp_path / "t.csv").exists() and not (tmp_path / "t.md").exists()
    with pytest.raises(ConfigError, match=expected[-1].replace("(", r"\(").replace(")", r"\)")):
        check_workflow_config_files(tmp_path / "absent_default.yaml", [str(path)])


def test_verbose_shows_the_traceback(tmp_path, capsys):
    path = _config_file(tmp_path, "- 1\n")
    assert main(["-v", "validate-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("start from config/config.yaml")


def test_dotted_override_through_a_scalar_is_a_config_error():
    with pytest.raises(ConfigError, match="seed.x: seed is 0, not a mapping"):
        load_config(None, overrides={"seed.x": 1})


def _set(cfg: dict, dotted: str, value) -> None:
    node = cfg
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value


# name -> (dotted overrides, substrings of the message); each names the key to fix
CROSS_CASES = {
    "brain_volume_reversed": ({"preprocess.brain_volume_ml": [2000, 800]},
                              ["preprocess.brain_volume_ml: range must be [low, high] with low < high, got [2000, 800]"]),
    "hu_window_reversed": ({"preprocess.hu_window": [100, 0]}, ["preprocess.hu_window: range must be"]),
    "hu_window_zero_width": ({"preprocess.hu_window": [40, 40]}, ["preprocess.hu_window:", "got [40, 40] HU"]),
    "hu_window_nan": ({"preprocess.hu_window": [float("nan"), 100]},
                      ["preprocess.hu_window.0: nan is not a finite number"]),
    "slice_thickness_reversed": ({"cohort.synthetic.slice_thickness_mm": [5.0, 1.0]},
                                 ["cohort.synthetic.slice_thickness_mm: range must be [low, high]"]),
    "expander_fraction_reversed": ({"cohort.synthetic.expander_fraction": [0.3, 0.1]},
                                   ["cohort.synthetic.expander_fraction: range must be [low, high]"]),
    "equal_mask_labels": ({"cohort.mask_labels": {"iph": 1, "ivh": 1}}, ["cohort.mask_labels: iph and ivh are both 1"]),
    "unet_channels_vs_groups": ({"diffusion.unet.channels": [32, 60], "diffusion.unet.num_head_channels": 4},
                                ["diffusion.unet.channels: [60] not divisible by diffusion.unet.norm_num_groups = 8"]),
    "vae_channels_vs_groups": ({"vae.channels": [16, 30, 64]}, ["vae.channels: [30] not divisible by vae.norm_num_groups"]),
    "attention_levels_length": ({"diffusion.unet.attention_levels": [False, True, True]},
                                ["diffusion.unet.attention_levels: 3 entries, but diffusion.unet.channels has 2"]),
    "head_channels": ({"diffusion.unet.num_head_channels": 24},
                      ["diffusion.unet.num_head_channels: 24 does not divide the attention channel count(s) [64]"]),
    "crop_vs_vae": ({"preprocess.crop": [64, 66]}, ["preprocess.crop: [64, 66] is not divisible by the VAE's latent "
                                                    "factor 4"]),
    "crop_vs_unet": ({"preprocess.crop": [64, 36]}, ["preprocess.crop: [64, 36] gives latents of [16, 9] pixels",
                                                     "use multiples of 8"]),
    "ddim_steps_vs_timesteps": ({"sampling.ddim_steps": 2000}, ["sampling.ddim_steps: 2000 exceeds diffusion.timesteps"]),
    "guidance_scales_repeated": ({"evaluation.guidance_scales": [0.0, 1.0, 1.0]},
                                 ["evaluation.guidance_scales: [1.0] listed more than once"]),
    "interval_levels_repeated": ({"evaluation.interval_levels": [0.5, 0.5]},
                                 ["evaluation.interval_levels: [0.5] listed more than once"]),
    "guidance_scale_negative": ({"evaluation.guidance_scales": [-1.0, 1.0]},
                                ["evaluation.guidance_scales.0: -1.0 is less than the minimum of 0"]),
    "interval_level_outside": ({"evaluation.interval_levels": [0.5, 1.0]}, ["evaluation.interval_levels.1: 1.0"]),
    "interval_levels_empty": ({"evaluation.interval_levels": []}, ["evaluation.interval_levels: [] should be non-empty"]),
    "n_samples_zero": ({"sampling.n_samples": 0}, ["sampling.n_samples: 0 is less than the minimum of 1"]),
    "template_mask_without_template": ({"preprocess.template_mask": "mask.nii.gz"},
                                       ["preprocess.template_mask: set, but preprocess.template is null"]),
    "sampling_variant_repeated": ({"sampling.variants": ["2D-ice", "2D-ice"]},
                                  ["sampling.variants: ['2D-ice'] listed more than once"]),
}


@pytest.mark.parametrize("case", sorted(CROSS_CASES))
def test_impossible_config_names_the_key(case, tmp_path, capsys):
    overrides, expected = CROSS_CASES[case]
    cfg = default_config()
    for dotted, value in overrides.items():
        _set(cfg, dotted, value)
    path = write_config(tmp_path / "cfg.yaml", cfg)
    code, err = _run(["validate-config", path], capsys)
    assert code == 2 and err.count("\n") == 1, err  # one problem: one line
    for t in expected:
        assert t in err, f"{t!r} not in {err!r}"


def test_cross_checks_keep_valid_shipped_shapes():
    cfg = default_config()
    cfg["diffusion"]["unet"].update(channels=[32, 64, 128], attention_levels=[False, False, True])  # 64 / 4 / 4
    validate_config(cfg)
    cfg["sampling"]["ddim_steps"] = cfg["diffusion"]["timesteps"]
    cfg["cohort"]["synthetic"]["slice_thickness_mm"] = [2.5, 2.5]  # a fixed thickness is a range too
    validate_config(cfg)


# --------------------------------------------------------------------------------------------- CLI IDs
HOSTILE_IDS = ["x/../../..", "../../escape", "../../../../../../../escaped", "..", ".", "-rf", "--help", "", "a b", "P1;rm -rf ~", "\uff21001",
               "A001/", "/tmp/abs"]
# The command line of each per-patient entry point; the ID goes where `{pid}` is (as `--opt=ID`, so
# an ID that looks like an option is still that option's value), or else after `--` as the positional.
COMMANDS = {
    "ingest": ["ingest"],
    "preprocess": ["preprocess"],
    "shard": ["shard"],
    "encode": ["encode"],
    "sample": ["sample", "--out", "{out}", "2D-ice"],
    "nnunet-export-test": ["nnunet-export-test"],
    "nnunet-predict": ["nnunet-predict", "2d"],
    "nnunet-masks": ["nnunet-masks", "nnunet_2d"],
    "build-template": ["build-template", "--patients=A001", "--patients={pid}"],
    "latent-stats": ["latent-stats", "--patients={pid}"],
    "train-classifier": ["train-classifier", "--patients={pid}"],
    "evaluate": ["evaluate", "--patients={pid}"],
    "simulate": ["simulate", "--ct", "ct.nii.gz", "--iph", "iph.nii.gz", "--out", "{out}", "--patient-id={pid}"],
}


def _tree(root: Path) -> set[str]:
    return {str(Path(d, f)) for d, dirs, files in os.walk(root) for f in [*files, *dirs]}


@pytest.fixture()
def hostile_setup(tmp_path):
    cohort = tmp_path / "deep" / "er"
    manifest = write_cohort(cohort / "raw" / "m.tsv", ["A001", "A002"], ["T001"])
    configfile = write_config(tmp_path / "deep" / "cfg.yaml", manifest_config(manifest, cohort / "results"))
    return configfile, tmp_path


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_hostile_patient_ids_never_write_outside_results(command, hostile_setup, capsys):
    configfile, tmp_path = hostile_setup
    watched = tmp_path.parent  # the tmp tree's parent: anything escaping results_dir lands here or above
    cwd = Path.cwd()
    before, before_cwd = _tree(watched), set(os.listdir(cwd))
    out = tmp_path / "out"
    for pid in HOSTILE_IDS:
        argv = [a.replace("{out}", str(out)).replace("{pid}", pid) for a in COMMANDS[command]]
        argv = [argv[0], "--config", str(configfile), *argv[1:]]
        if not any("{pid}" in a for a in COMMANDS[command]):
            argv += ["--", pid]
        code, err = _run(argv, capsys)
        assert code == 2, (argv, err)
        assert f"hemexp {command}: " in err and "(IDs are the manifest's patient_id)" in err, (argv, err)
        assert repr(pid)[1:-1] in err or pid == "", (argv, err)  # the message names the ID
    assert _tree(watched) == before, sorted(_tree(watched) ^ before)
    assert set(os.listdir(cwd)) == before_cwd
    assert not out.exists()


def test_argparse_usage_error_is_exit_2(capsys):
    assert main(["ingest", "-rf"]) == 2  # `-rf` reads as an unknown option
    assert "the following arguments are required: patient" in capsys.readouterr().err


def test_per_patient_input_error_is_exit_1_with_a_record_inside_results(tmp_path, capsys):
    """A valid ID whose input is bad (here: a missing raw file) fails that patient only: exit 1, one
    line naming patient and file, a failure record under results/qc/failures/."""
    cohort = tmp_path / "c"
    manifest = write_cohort(cohort / "raw" / "m.tsv", ["A001", "A002"], ["T001"])
    (cohort / "raw" / "A001" / "baseline_ct.nii.gz").unlink()
    results = cohort / "results"
    configfile = write_config(cohort / "cfg.yaml", manifest_config(manifest, results))
    code, err = _run(["ingest", "A001", "--config", configfile], capsys)
    assert code == 1 and err.startswith("hemexp ingest: patient A001, file ") and "baseline_ct.nii.gz" in err
    assert err.count("\n") == 1
    records = list((results / "qc" / "failures").glob("*.json"))
    assert [r.name for r in records] == ["ingest__A001.json"]
    assert not (results / "ingested" / "A001").exists()
    code, err = _run(["ingest", "NOPE", "--config", configfile], capsys)
    assert code == 1 and "patient NOPE" in err and "not in the manifest" in err


def test_hemexp_script_exit_code_and_stderr(tmp_path):
    """The installed `hemexp` entry point (a fresh process): exit 2, one line, no traceback."""
    out = subprocess.run([sys.executable, "-m", "hemexp.cli", "validate-manifest", str(_text(tmp_path, b""))],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "file is empty" in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.startswith("hemexp validate-manifest: manifest manifest.tsv: 1 problem(s)")
