"""Communication accounting pass: records the collectives of one forward in `osp_report.communication`."""
from __future__ import annotations

import torch.fx as fx

from osp_compile.communication import account, summarize
from osp_compile.report import PassReport
from .token_layout import sp_info


def comm_accounting_pass(gm: fx.GraphModule, ctx) -> tuple[fx.GraphModule, PassReport]:
    sp = sp_info(ctx.config)
    sites = ctx.analysis.video_sites if ctx.analysis is not None else []
    if sp.world <= 1 or not sites:
        return gm, PassReport("comm_accounting", "no collectives (one rank)")
    grid = sites[0].grid
    summary = summarize(account(gm, grid, ctx.config.sparse_ratio, sp.world))
    ctx.report.communication = summary
    kinds = ", ".join(f"{n} {k}" for k, n in summary["collectives"].items())
    return gm, PassReport("comm_accounting", f"per forward: {kinds}; {summary['bytes_per_rank_mean'] / 1e6:.3f} MB "
                                             f"sent per rank", summary["list"])
