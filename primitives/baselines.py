"""Known pruning metrics written in the expression language: they seed the search and are
the baselines of every comparison. Higher score = keep the filter."""
from __future__ import annotations

from dataclasses import dataclass

from evoprune.errors import UnknownName
from evoprune.primitives.expr import Node, parse


@dataclass(frozen=True)
class Baseline:
    name: str
    expression: str
    description: str

    @property
    def node(self) -> Node:
        return parse(self.expression)


_MP, _MQ, _VP, _VQ = "cls_mean_in", "cls_mean_out", "cls_var_in", "cls_var_out"
_DIFF2 = f"square(sub({_MP}, {_MQ}))"

BASELINES: dict[str, Baseline] = {b.name: b for b in [
    Baseline("l1", "w_l1", "L1 norm of the filter (Li et al. 2017)"),
    Baseline("l2", "w_l2", "L2 norm of the filter"),
    Baseline("bn_scale", "bn_abs_gamma", "|BN gamma| (network slimming, Liu et al. 2017)"),
    Baseline("fpgm", "fpgm_dist", "distance to the other filters (FPGM, He et al. 2019)"),
    Baseline("taylor", "taylor_act", "first-order Taylor on activations (Molchanov et al. 2017)"),
    Baseline("taylor_w", "taylor_w", "first-order Taylor on weights, as Torch-Pruning's TaylorImportance"),
    Baseline("apoz", "neg(act_zero_frac)", "average percentage of zeros, fewer kept (Hu et al. 2016)"),
    Baseline("pfp", "pfp_sens", "data-informed sensitivity, deterministic top-s (PFP, Liebenwein et al. 2020)"),
    Baseline("leverage", "spec_leverage", "leverage on the top singular subspace (spectral)"),
    Baseline("abs_snr", f"div(abs(sub({_MP}, {_MQ})), add(sqrt({_VP}), sqrt({_VQ})))",
             "ETPF seed: |mu_P - mu_Q| / (sigma_P + sigma_Q), averaged over classes"),
    Baseline("fisher", f"div({_DIFF2}, add({_VP}, {_VQ}))",
             "ETPF seed: Fisher discriminant ratio, averaged over classes"),
    Baseline("tstat", f"div(abs(sub({_MP}, {_MQ})), sqrt(add(div({_VP}, cls_n_in), div({_VQ}, cls_n_out))))",
             "ETPF seed: two-sample t-statistic, averaged over classes"),
    Baseline("symdiv", f"add(mul(0.5, add(div({_VP}, {_VQ}), div({_VQ}, {_VP}))), "
                       f"mul(0.5, mul({_DIFF2}, add(div(1.0, {_VP}), div(1.0, {_VQ})))))",
             "ETPF seed: symmetric (Gaussian KL) divergence of class k vs the rest, averaged over classes"),
    Baseline("etpf_a", f"add({_VP}, div(square(sub({_VQ}, act_mean)), add(add({_VP}, {_VQ}), 0.05)))",
             "ETPF evolved winner sigma2_P + (sigma2_Q - m_X)^2 / (sigma2_P + sigma2_Q + 0.05); "
             "m_X (per-position mean) taken as the channel's mean activation"),
    Baseline("etpf_b", f"add(add(div({_VP}, add({_VQ}, 0.05)), div({_VQ}, add({_VP}, 0.05))), "
                       f"div({_DIFF2}, add(add({_VP}, {_VQ}), 0.05)))",
             "ETPF evolved winner sigma2_P/(sigma2_Q+0.05) + sigma2_Q/(sigma2_P+0.05) + (...)^2/(...+0.05); "
             "the elided square taken as (mu_P - mu_Q)^2"),
]}


def get_baseline(name: str) -> Baseline:
    if name not in BASELINES:
        raise UnknownName("baseline", name, list(BASELINES))
    return BASELINES[name]
