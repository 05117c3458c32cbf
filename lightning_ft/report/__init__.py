"""Run reports: one page a user opens first after a fit, and a comparison of several runs.

- ``write_run_report(run_dir)``: ``report.html`` (figures embedded) and ``report/*.png`` in the run folder; the
  ``RunReport`` callback writes it at the end of every fit the CLI runs.
- ``write_comparison(run_dirs, out)``: curves overlaid, final grids side by side and a ranked table.
- ``write_model_card(...)``: the export folder's ``README.md`` with the Hub's metadata.

``python -m lightning_ft.report RUN_DIR [RUN_DIR ...]`` does the first (one run) or the second (several). Nothing is
imported until used: the callbacks import this package, and the report's modules import the stage rules.
"""

from importlib import import_module

_EXPORTS = {
    "write_run_report": "lightning_ft.report.run_report",
    "build_run_report": "lightning_ft.report.run_report",
    "read_run": "lightning_ft.report.run_folder",
    "find_runs": "lightning_ft.report.run_folder",
    "write_comparison": "lightning_ft.report.compare",
    "write_model_card": "lightning_ft.report.model_card",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_ft.report' has no attribute {name!r}")
