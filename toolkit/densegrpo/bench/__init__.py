"""``densegrpo bench sparse-vs-dense``: credit-assignment schemes compared on the toy world.

Every arm is a plain combination of registered components (config overrides), run with
the same GRPO loop as ``densegrpo train``. Results land in ``OUT/``: ``results.json``
(every curve and summary), ``report.md`` (tables), PNG curves against iteration, NFE and
wall-clock (mean +- std over seeds), and the calibrated psi(t) against the uniform level.

* :mod:`~densegrpo.bench.arms`: the arms, the profiles, an arm's run config;
* :mod:`~densegrpo.bench.orchestrate`: the runs, ``results.json``, re-rendering;
* :mod:`~densegrpo.bench.stats`: per-run curves and per-arm statistics over seeds;
* :mod:`~densegrpo.bench.costs`: micro-benchmarks of an iteration's parts;
* :mod:`~densegrpo.bench.report`: ``report.md`` and the plots.

Part of the face: it runs trainings (:mod:`densegrpo.run`) and is run by the CLI; it never imports the CLI.
"""

from densegrpo.bench.arms import (
    ARMS,
    DEFAULT_REWARDS,
    PROFILES,
    Arm,
    Profile,
    arm_config,
    uniform_level,
)
from densegrpo.bench.costs import measure_costs
from densegrpo.bench.orchestrate import rerender, run_sparse_vs_dense
from densegrpo.bench.report import plot_curves, plot_psi, render_report
from densegrpo.bench.stats import summarise, summarise_run

__all__ = [
    "ARMS",
    "Arm",
    "DEFAULT_REWARDS",
    "PROFILES",
    "Profile",
    "arm_config",
    "measure_costs",
    "plot_curves",
    "plot_psi",
    "render_report",
    "rerender",
    "run_sparse_vs_dense",
    "summarise",
    "summarise_run",
    "uniform_level",
]
