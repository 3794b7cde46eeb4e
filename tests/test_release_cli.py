"""``fedcommons release ...`` commands on a small signed registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from typer.testing import CliRunner

from fedcommons.cli import app
from fedcommons.errors import PatchBaseMismatchError, ReleaseNotFoundError
from fedcommons.fileio import config_dir
from fedcommons.releases.registry import Registry
from fedcommons.releases.signing import Signer, public_pem
from tests.release_helpers import publish, run_python, weights

runner = CliRunner()


@pytest.fixture
def reg_path(tmp_path: Path) -> Path:
    """1.0.0 -> 1.0.1 (two entries changed) -> 1.1.0 (a head added)."""
    signer = Signer.load_or_create(config_dir() / "signing-key.pem")  # the default key
    reg = Registry(tmp_path / "reg")
    w0 = weights(0)
    a = publish(reg, signer, w0)
    w1 = {k: v.clone() for k, v in w0.items()}
    w1["net.0.bias"][:2] += 1.0
    b = publish(reg, signer, w1, parent=a)
    w2 = dict(w1, **{"head.weight": torch.zeros(3, 10)})
    publish(reg, signer, w2, parent=b, bump="minor")
    return tmp_path / "reg"


def _run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=True)


def test_list_shows_versions_bumps_and_aliases(reg_path: Path) -> None:
    assert (
        _run("release", "promote", "1.0.1", "--alias", "stable", "-r", str(reg_path)).exit_code == 0
    )
    out = _run("release", "list", "-r", str(reg_path), "--format", "json")
    rows = json.loads(out.stdout)
    assert [(r["version"], r["bump"]) for r in rows] == [
        ("1.0.0", "major"),
        ("1.0.1", "patch"),
        ("1.1.0", "minor"),
    ]
    assert rows[1]["aliases"] == ["stable"] and rows[2]["aliases"] == ["candidate"]
    assert _run("release", "tag", "1.0.1", "audited=yes", "-r", str(reg_path)).exit_code == 0
    shown = _run("release", "show", "@stable", "-r", str(reg_path), "--format", "json")
    assert json.loads(shown.stdout)["version"] == "1.0.1"
    assert json.loads(shown.stdout)["tags"] == {"audited": "yes"}


def test_verify_all_passes_then_fails_naming_the_file(reg_path: Path) -> None:
    ok = _run("release", "verify", "--all", "-r", str(reg_path))
    assert ok.exit_code == 0 and ok.stdout.count("OK") == 4
    assert "HEAD.json attests 3 release(s)" in ok.stdout
    card = reg_path / "releases" / "line" / "1.0.1" / "README.md"
    card.write_text(card.read_text() + "tampered\n")
    bad = _run("release", "verify", "1.1.0", "-r", str(reg_path), "--format", "json")
    assert bad.exit_code == 1
    (result,) = json.loads(bad.stdout)["releases"]
    assert result["path"] == str(card) and not result["ok"]


def test_verify_with_pinned_public_key(reg_path: Path, tmp_path: Path) -> None:
    pub = tmp_path / "pinned.pub"
    pub.write_bytes((reg_path / "keys" / "ed25519.pub").read_bytes())
    assert (
        _run("release", "verify", "latest", "-r", str(reg_path), "--public-key", str(pub)).exit_code
        == 0
    )
    pub.write_bytes(public_pem(Signer.generate().public_key))
    assert (
        _run("release", "verify", "latest", "-r", str(reg_path), "--public-key", str(pub)).exit_code
        == 1
    )


def test_diff_reports_changed_entries(reg_path: Path) -> None:
    out = _run("release", "diff", "1.0.0", "1.0.1", "-r", str(reg_path), "--format", "json")
    doc = json.loads(out.stdout)
    assert doc["changed_entries"] == 2 and doc["added"] == []
    changed = [t for t in doc["tensors"] if t["status"] == "changed"]
    assert [t["name"] for t in changed] == ["net.0.bias"]
    table = _run("release", "diff", "1.0.1", "1.1.0", "-r", str(reg_path))
    assert "added 1, removed 0, replaced 0 tensor(s)" in table.stdout


def test_patch_then_apply_reproduces_b_bit_for_bit(reg_path: Path, tmp_path: Path) -> None:
    reg = Registry(reg_path)
    for a, b in (("1.0.0", "1.0.1"), ("1.0.1", "1.1.0"), ("1.1.0", "1.0.0")):
        patch, out = tmp_path / f"{a}-{b}.patch", tmp_path / f"{b}.safetensors"
        assert _run("release", "patch", a, b, "-o", str(patch), "-r", str(reg_path)).exit_code == 0
        assert (
            _run("release", "apply", a, str(patch), "-o", str(out), "-r", str(reg_path)).exit_code
            == 0
        )
        assert out.read_bytes() == reg.get(b).weights_path.read_bytes()


def test_apply_to_the_wrong_base_is_refused_with_both_hashes(
    reg_path: Path, tmp_path: Path
) -> None:
    """Input: the 1.0.0 -> 1.0.1 patch applied to 1.1.0."""
    reg = Registry(reg_path)
    patch = tmp_path / "p"
    _run("release", "patch", "1.0.0", "1.0.1", "-o", str(patch), "-r", str(reg_path))
    res = _run(
        "release", "apply", "1.1.0", str(patch), "-o", str(tmp_path / "o"), "-r", str(reg_path)
    )
    assert isinstance(res.exception, PatchBaseMismatchError)
    assert reg.get("1.0.0").weights_sha256 in str(res.exception)
    assert reg.get("1.1.0").weights_sha256 in str(res.exception)
    assert not (tmp_path / "o").exists()


def test_export_safetensors_and_torch(reg_path: Path, tmp_path: Path) -> None:
    reg = Registry(reg_path)
    st, pt = tmp_path / "w.safetensors", tmp_path / "w.pt"
    assert (
        _run(
            "release",
            "export",
            "1.0.1",
            "--format",
            "safetensors",
            "-o",
            str(st),
            "-r",
            str(reg_path),
        ).exit_code
        == 0
    )
    assert (
        _run(
            "release", "export", "1.0.1", "--format", "torch", "-o", str(pt), "-r", str(reg_path)
        ).exit_code
        == 0
    )
    assert st.read_bytes() == reg.get("1.0.1").weights_path.read_bytes()
    loaded = torch.load(pt, weights_only=True)
    expected = st_load(st.read_bytes())
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in loaded)


def test_rejected_and_card_commands(reg_path: Path) -> None:
    reg = Registry(reg_path)
    reg.record_rejection(
        "line", weights(9), parent=reg.get("1.0.1"), reasons=["accuracy: degraded"], report={}
    )
    out = json.loads(_run("release", "rejected", "-r", str(reg_path), "--format", "json").stdout)
    assert out[0]["reasons"] == ["accuracy: degraded"] and out[0]["parent_version"] == "1.0.1"
    card = _run("release", "card", "1.1.0", "-r", str(reg_path))
    assert card.stdout.startswith("---") and "# line 1.1.0" in card.stdout


def test_unknown_version_is_a_typed_error_listing_what_exists(reg_path: Path) -> None:
    """Input: `release show 7.0.0`."""
    res = _run("release", "show", "7.0.0", "-r", str(reg_path))
    assert isinstance(res.exception, ReleaseNotFoundError)
    assert "1.0.0, 1.0.1, 1.1.0" in str(res.exception)


def test_cli_exit_code_two_and_one_line_for_unknown_alias(reg_path: Path) -> None:
    """Input: `fedcommons release verify @prod` in a real process."""
    proc = run_python(
        "import sys; from fedcommons.cli import main; "
        f"sys.argv=['fedcommons','release','verify','@prod','-r',{str(reg_path)!r}]; main()"
    )
    assert proc.returncode == 2
    assert "ReleaseNotFoundError" in proc.stderr and "1.0.0" in proc.stderr


def test_verify_reports_the_trust_source_and_trust_add_pins_the_signer(reg_path: Path) -> None:
    """Input tried: verify unpinned, `release trust add FINGERPRINT`, verify again, remove."""
    unpinned = json.loads(
        _run("release", "verify", "--all", "-r", str(reg_path), "--format", "json").stdout
    )
    assert unpinned["trust"]["source"] == "registry" and not unpinned["trust"]["pinned"]
    fingerprint = unpinned["trust"]["key_id"]
    assert _run("release", "trust", "add", fingerprint[:16], "-r", str(reg_path)).exit_code == 0
    listed = json.loads(_run("release", "trust", "list", "--format", "json").stdout)
    assert [pin["key_id"] for pin in listed.values()] == [fingerprint]
    pinned = json.loads(
        _run("release", "verify", "--all", "-r", str(reg_path), "--format", "json").stdout
    )
    assert pinned["ok"] and pinned["trust"]["source"] == "trust-file"
    assert _run("release", "trust", "remove", "-r", str(reg_path)).exit_code == 0
    assert json.loads(_run("release", "trust", "list", "--format", "json").stdout) == {}
