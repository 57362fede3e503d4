"""A shipped testbed rebuilt from its config and compared with the shipped weights (`taopd testbed --rebuild`), and
the maintainers' command that ships a build (`python -m diagnostics.testbed.rebuild --ship NAME CONFIG`).

Builds run on one thread and are deterministic on one CPU type, so a rebuild on the CPU type of the shipped build
gives the same bits. Elsewhere float rounding differs between instruction sets and the weights drift apart over
thousands of steps; the rebuild is then held to its structure (the same checkpoints, tensor names and shapes) and,
for the default pair, to the report's criteria (`report.criteria_failures`); the largest weight difference is
printed either way.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from diagnostics.core.config import load_config
from diagnostics.testbed.build import Testbed, build_testbed
from diagnostics.testbed.config import TestbedConfig
from diagnostics.testbed.manifest import (
    SHIPPED_DIR,
    cpu_identity,
    find_shipped,
    shipped_entry,
    write_manifest_entry,
)
from diagnostics.testbed.report import CRITERIA, criteria_failures

WEIGHTS = "model.safetensors"


@dataclass
class Comparison:
    """A rebuild against the shipped testbed `name`."""

    name: str
    shipped_root: Path
    same_cpu: bool  # built here on the shipped build's CPU type (and torch): bit identity expected
    identical: bool  # every weight of every checkpoint bit for bit
    max_diff: dict[str, float]  # checkpoint -> max |rebuilt - shipped| over its weights
    structure: list[str] = field(default_factory=list)  # differences in checkpoints, tensor names or shapes
    criteria: list[str] = field(default_factory=list)  # the report's criteria the rebuild fails

    @property
    def ok(self) -> bool:
        """Bit identical, or (another CPU type) the same structure and the report's criteria met."""
        return self.identical or (not self.same_cpu and not self.structure and not self.criteria)

    def lines(self) -> list[str]:
        """The comparison as printed by `taopd testbed --rebuild`."""
        diffs = ", ".join(f"{name} {diff:.3g}" for name, diff in self.max_diff.items())
        where = "this CPU type" if self.same_cpu else "another CPU type (or torch) than here"
        lines = [f"rebuilt vs shipped '{self.name}' ({self.shipped_root}), shipped from a build on {where}",
                 f"weights: {'bit-identical' if self.identical else 'differ'}; max |weight difference|: {diffs}"]
        lines += [f"structure differs: {s}" for s in self.structure]
        if self.name in CRITERIA:
            lines.append("criteria: " + ("all met" if not self.criteria else "MISSED " + "; ".join(self.criteria)))
        if self.identical:
            lines.append("verdict: the same testbed, bit for bit")
        elif self.ok:
            lines.append("verdict: the same testbed up to float rounding (another CPU type): structure, criteria hold")
        else:
            lines.append("verdict: FAILED (" + ("differs on the shipped build's CPU type" if self.same_cpu
                                               else "structure or criteria") + ")")
        return lines


def checkpoints(root: Path) -> list[str]:
    """The model directories of a testbed (teacher, student, student_capacity where built)."""
    return sorted(p.parent.name for p in root.glob(f"*/{WEIGHTS}"))


def compare_weights(shipped: Path, rebuilt: Path) -> tuple[dict[str, float], list[str]]:
    """(checkpoint -> max |difference| of its weights, structural differences) between two testbed roots."""
    names_a, names_b = checkpoints(shipped), checkpoints(rebuilt)
    structure = [f"checkpoint {n} only in one" for n in sorted(set(names_a) ^ set(names_b))]
    max_diff: dict[str, float] = {}
    for name in sorted(set(names_a) & set(names_b)):
        with safe_open(shipped / name / WEIGHTS, "pt") as a, safe_open(rebuilt / name / WEIGHTS, "pt") as b:
            keys_a, keys_b = set(a.keys()), set(b.keys())
            structure += [f"{name}: tensor {k} only in one" for k in sorted(keys_a ^ keys_b)]
            worst = 0.0
            for key in sorted(keys_a & keys_b):
                x, y = a.get_tensor(key), b.get_tensor(key)
                if x.shape != y.shape:
                    structure.append(f"{name}: {key} has shape {tuple(y.shape)}, shipped {tuple(x.shape)}")
                    continue
                worst = max(worst, (x.double() - y.double()).abs().max().item() if x.numel() else 0.0)
            max_diff[name] = worst
    return max_diff, structure


def rebuild_testbed(config: TestbedConfig) -> tuple[Testbed, Comparison | None]:
    """Train `config`'s testbed from scratch into its cache directory; compared with the shipped one of its hash
    (None where none is shipped)."""
    shipped = find_shipped(config)  # verified first: a tampered shipped file is an error before the long build
    built = build_testbed(config, force=True, use_shipped=False)
    if shipped is None:
        return built, None
    name, root = shipped
    max_diff, structure = compare_weights(root, built.root)
    identical = not structure and all(d == 0 for d in max_diff.values())
    _, entry = shipped_entry(config)
    failures = criteria_failures(built.report, CRITERIA[name]) if name in CRITERIA else []
    return built, Comparison(name, root, entry["built_on"] == cpu_identity(), identical, max_diff, structure, failures)


def ship_testbed(name: str, config_file: str) -> Path:
    """Copy the cached (else freshly built) testbed of `config_file` into the package as `name`; its manifest entry."""
    config = load_config(TestbedConfig, config_file)
    built = build_testbed(config, use_shipped=False)
    target = SHIPPED_DIR / name
    tmp = target.with_name(f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(built.root, tmp)
    saved = json.loads((tmp / "config.json").read_text())
    saved.pop("cache_dir")  # where it was built is not part of what was built
    (tmp / "config.json").write_text(json.dumps(saved, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    write_manifest_entry(name, target, config, config_file, SHIPPED_DIR)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ship a built testbed inside the package (maintainers)")
    parser.add_argument("--ship", nargs=2, metavar=("NAME", "CONFIG"), required=True,
                        help="e.g. default configs/testbed.yaml")
    args = parser.parse_args(argv)
    print(ship_testbed(*args.ship))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
