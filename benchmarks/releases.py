"""Release benchmarks: patch size, validation-gate time, chain verification time.

Run as ``python -m benchmarks.releases`` (add ``--quick`` for a smoke run). Every figure
comes with the baseline it is divided by, measured in the same run:

- patch size / full release weights file, for a round that changed ≤ 1 % of entries
  (the demo model after a real local-training step whose update was sparsified to its
  top-k entries, and larger MLPs with random 1 % / 0.1 % / 5 % changes);
- validation-gate time / one plain evaluation pass over the same split (the gate scores
  candidate and parent and fingerprints the data), on CPU and on CUDA when present;
- verification time of a 20-release chain (and the signed HEAD.json) / SHA-256 of the
  same files alone.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save as st_save

from benchmarks.progress import steps
from fedcommons.logs import configure_logging
from fedcommons.releases.card import render_card
from fedcommons.releases.gate import default_suite, run_gate
from fedcommons.releases.patches import apply_patch, make_patch
from fedcommons.releases.registry import Registry, Release
from fedcommons.releases.signing import Signer
from fedcommons.releases.verification import Verifier
from fedcommons.tasks.digits import DigitsTask
from fedcommons.wire.manifest import ReleaseManifest

console = Console(width=170)


def _mlp(hidden: str) -> dict[str, torch.Tensor]:
    return {
        k: v.clone() for k, v in DigitsTask({"hidden": hidden}).build_model().state_dict().items()
    }


def _trained_round_topk(fraction: float) -> tuple[dict, dict]:
    """Demo model before/after one local epoch, the update kept to its top-k entries."""
    task = DigitsTask()
    model = task.build_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in task.train_loader(16, seed=0):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    delta = {k: v.detach() - base[k] for k, v in model.state_dict().items()}
    flat = torch.cat([d.reshape(-1) for d in delta.values()])
    k = max(1, int(fraction * flat.numel()))
    threshold = flat.abs().topk(k).values.min()
    after = {
        n: base[n] + torch.where(d.abs() >= threshold, d, torch.zeros_like(d))
        for n, d in delta.items()
    }
    return base, after


def _random_change(w: dict, fraction: float, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in w.items()}
    flat_sizes = [v.numel() for v in out.values()]
    total = sum(flat_sizes)
    idx = torch.randperm(total, generator=g)[: max(1, int(fraction * total))]
    flat = torch.cat([v.reshape(-1) for v in out.values()])
    flat[idx] += 0.01 * torch.randn(len(idx), generator=g)
    offset = 0
    for k, v in out.items():
        out[k] = flat[offset : offset + v.numel()].reshape(v.shape).clone()
        offset += v.numel()
    return out


def bench_patches(quick: bool) -> Table:
    table = Table(title="patch size vs full release (weights file)")
    for col in (
        "model",
        "parameters",
        "change",
        "changed entries",
        "full bytes",
        "patch bytes",
        "patch/full",
        "apply ok",
    ):
        table.add_column(col, justify="right")
    cases = []
    base, after = _trained_round_topk(0.01)
    cases.append(("demo 64 (trained round, top-1%)", base, after))
    for hidden in ("256,256",) if quick else ("256,256", "1024,1024"):
        w = _mlp(hidden)
        for frac in (0.001, 0.01, 0.05):
            cases.append((f"mlp {hidden} (random {frac:.1%})", w, _random_change(w, frac)))
    for label, a, b in steps(cases, "patches"):
        a_bytes, b_bytes = st_save(a), st_save(b)
        patch = make_patch(a_bytes, b_bytes)
        ok = apply_patch(a_bytes, patch.data) == b_bytes
        n = sum(v.numel() for v in a.values())
        table.add_row(
            label.split(" (")[0],
            f"{n:,}",
            label.split(" (")[1].rstrip(")"),
            f"{patch.changed_entries:,} ({patch.changed_entries / n:.2%})",
            f"{len(b_bytes):,}",
            f"{patch.size:,}",
            f"{patch.size / len(b_bytes):.2%}",
            "yes" if ok else "NO",
        )
    return table


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def bench_gate(quick: bool) -> Table:
    table = Table(title="validation gate, demo model (digits validation split, 359 examples)")
    for col in (
        "device",
        "plain eval pass (s)",
        "gate: candidate+parent (s)",
        "gate/plain",
        "gate tasks",
    ):
        table.add_column(col, justify="right")
    task = DigitsTask()
    suite = default_suite(task)
    candidate = task.build_model().state_dict()
    parent = {k: v + 0.001 for k, v in candidate.items()}
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    repeats = 5 if quick else 30
    for device in steps(devices, "validation gate"):

        def plain(device: torch.device = device) -> None:
            model = task.build_model()
            model.load_state_dict(candidate)
            model.to(device)
            task.evaluate(model, task.validation_loader())
            if device.type == "cuda":
                torch.cuda.synchronize()

        def gate(device: torch.device = device) -> None:
            run_gate(task, suite, candidate, parent=parent, device=device)

        t_plain, t_gate = _time(plain, repeats), _time(gate, repeats)
        name = str(device) if device.type == "cpu" else torch.cuda.get_device_name()
        table.add_row(
            name,
            f"{t_plain:.4f}",
            f"{t_gate:.4f}",
            f"{t_gate / t_plain:.2f}x",
            str(len(suite.tasks)),
        )
    return table


def _chain(root: Path, hidden: str, n: int) -> tuple[Registry, Release]:
    reg = Registry(root)
    signer = Signer.generate()
    w = _mlp(hidden)
    parent: Release | None = None
    for i in range(n):
        w = _random_change(w, 0.01, seed=i)

        def build(version: str, digest: str, size: int, parent=parent, w=w) -> ReleaseManifest:
            return ReleaseManifest.for_weights(
                "bench",
                version,
                digest,
                size,
                sum(v.numel() for v in w.values()),
                parent=parent,
                strategy="fedavg",
                rounds=1,
                contributors=1,
                code_version="bench",
            )

        parent = reg.publish(
            "bench", w, build, signer=signer, parent=parent, render_card=render_card
        )
    assert parent is not None
    return reg, parent


def bench_chain(quick: bool) -> Table:
    table = Table(title="verify a 20-release chain (hashes + Ed25519 + parent links)")
    for col in (
        "model",
        "weights/release",
        "sha256 of files only (s)",
        "verify chain (s)",
        "verify/hash",
        "< 2 s",
    ):
        table.add_column(col, justify="right")
    for hidden in steps(("64",) if quick else ("64", "1024,1024"), "release chains"):
        with tempfile.TemporaryDirectory() as tmp:
            reg, head = _chain(Path(tmp) / "reg", hidden, 20)
            releases = reg.releases("bench")
            files = [
                p
                for r in releases
                for p in (r.weights_path, r.manifest_path, r.signature_path, r.card_path)
            ]

            def hash_only(files: list[Path] = files) -> None:
                for p in files:
                    hashlib.sha256(p.read_bytes()).hexdigest()

            def verify(reg: Registry = reg, head: Release = head) -> None:
                verifier = Verifier(reg)
                result = verifier.verify(reg.get(head.version, name="bench"))
                assert result.ok and len(result.chain) == 20, result.error
                assert verifier.verify_head("bench").attested == 20

            t_hash, t_verify = _time(hash_only, 5), _time(verify, 5)
            size = releases[0].weights_path.stat().st_size
            table.add_row(
                f"mlp {hidden}",
                f"{size:,} B",
                f"{t_hash:.4f}",
                f"{t_verify:.4f}",
                f"{t_verify / t_hash:.2f}x",
                "yes" if t_verify < 2 else "NO",
            )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller, faster smoke run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    configure_logging("WARNING")
    console.print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"cuda {torch.cuda.is_available()}"
    )
    console.print(bench_patches(args.quick))
    console.print(bench_gate(args.quick))
    console.print(bench_chain(args.quick))


if __name__ == "__main__":
    main()
