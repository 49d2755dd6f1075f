"""The loss registry: every training objective of the framework, as pure functions.

Each loss is a pure function of per-token or per-sequence tensors (``dpo_loss``...), written
after the equations of ``docs/losses.md`` with its tensor shapes in the docstring, plus a
``LossSpec`` registered under its config name (``@register``, prefkd/loss_spec.py) that declares
what it needs (a reference and which of its outputs, a teacher, pairs or single targets,
generations, a scalar head) and maps the trainer's ``LossInputs`` onto the pure function. The
trainer never branches on a loss name. Masks and log-probabilities (prefkd/logprobs.py), the
chunked output layer (prefkd/logits.py) and per-token terms (prefkd/token_terms.py) live below.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from prefkd.logits import LazyLogits, chunk_positions, chunked, log_softmax_f32
from prefkd.logprobs import (check_teacher_vocab, chunked_token_logps, collapse_topk, gather_next, last_token_mask,
                             sequence_logps, shifted_targets, split_pairs, teacher_topk_ids)
from prefkd.loss_spec import (Generation, LossInputs, check_top_k_vocab, pair_logps, preference_metrics,
                              register, require, reward_metrics, teacher_sequence, validate_generation)
from prefkd.token_terms import (ACTION_POTENTIALS, STATE_POTENTIALS, action_potential, generalized_jsd,
                                log_sum_squared_probs, released_rewards, state_potential, tdpo_token_terms,
                                token_divergence, token_fkl)


# ------------------------------------------------------------------ pure losses

def sft_loss(policy_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean token negative log-likelihood of each target.

    Args:
        policy_logps: [B, T] per-token log pi_theta(y_t|s_t), zero off the response.
        mask: [B, T] response mask.
    Returns:
        [B] per-example mean NLL. The batch loss is their mean, so that it decomposes
        exactly over data-parallel ranks holding equal numbers of examples.
    """
    return -sequence_logps(policy_logps, mask, average=True)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
             beta: float, label_smoothing: float = 0.0, reference_free: bool = False):
    """DPO (Rafailov et al. 2023, Eq. 7) and conservative DPO.

        h    = [L_theta(y_w) - L_ref(y_w)] - [L_theta(y_l) - L_ref(y_l)]
        loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)

    Args:
        *_logps: [B] summed response log-probs.
        beta: inverse temperature of the implicit reward.
        label_smoothing: eps, the assumed probability that a label is flipped (cDPO).
        reference_free: use L_ref = 0 (a uniform reference).
    Returns:
        losses [B], chosen_rewards [B], rejected_rewards [B]  (rewards = beta (L_theta - L_ref), detached).
    """
    if reference_free:
        reference_chosen_logps = torch.zeros_like(reference_chosen_logps)
        reference_rejected_logps = torch.zeros_like(reference_rejected_logps)
    h = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def ipo_loss(policy_chosen_avg_logps: torch.Tensor, policy_rejected_avg_logps: torch.Tensor,
             reference_chosen_avg_logps: torch.Tensor, reference_rejected_avg_logps: torch.Tensor,
             beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, Eq. 17) with length-averaged log-probs, as the paper and TRL do.

        h'   = [avg L_theta(y_w) - avg L_ref(y_w)] - [avg L_theta(y_l) - avg L_ref(y_l)]
        loss = (h' - 1 / (2 beta))^2

    Args: [B] length-averaged response log-probs; beta the regularisation strength.
    Returns: [B] losses.
    """
    h = (policy_chosen_avg_logps - reference_chosen_avg_logps) - (policy_rejected_avg_logps - reference_rejected_avg_logps)
    return (h - 1.0 / (2.0 * beta)) ** 2


# ------------------------------------------------------------------ sft / dpo / ipo

@register("sft", pairwise=False, sft_targets=True)
def _sft(inp: LossInputs, cfg):
    losses = sft_loss(inp.policy_logps, inp.mask)
    return losses.mean(), {"logps/chosen": sequence_logps(inp.policy_logps, inp.mask).detach()}


def _validate_dpo(cfg):
    require(cfg, "beta", positive=True)
    eps = cfg.get("label_smoothing", 0.0) or 0.0
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"loss.label_smoothing must be in [0, 0.5), got {eps}")


@register("dpo", reference=lambda cfg: None if cfg.get("reference_free", False) else "logps",
          validate=_validate_dpo)
def _dpo(inp: LossInputs, cfg):
    pc, pr, rc, rr = pair_logps(inp)
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.get("label_smoothing", 0.0) or 0.0,
                              reference_free=cfg.get("reference_free", False))
    return losses.mean(), preference_metrics(cr, rj, pc, pr)


@register("ipo", reference="logps", validate=lambda cfg: require(cfg, "beta", positive=True))
def _ipo(inp: LossInputs, cfg):
    pc, pr, rc, rr = pair_logps(inp, average=True)
    losses = ipo_loss(pc, pr, rc, rr, cfg.beta)
    pcs, prs, rcs, rrs = pair_logps(inp)
    return losses.mean(), preference_metrics(cfg.beta * (pcs - rcs), cfg.beta * (prs - rrs), pcs, prs)


# ================================================================== teacher-based losses (vocabulary-sized work chunked)


# ------------------------------------------------------------------ tdpo


def tdpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
              chosen_kl, rejected_kl, beta: float, alpha: float, if_tdpo2: bool = True):
    """TDPO (Zeng et al. 2024, Eq. 12 / TDPO repo `tdpo_loss`).

        h     = [L_theta(y_w) - L_ref(y_w)] - [L_theta(y_l) - L_ref(y_l)]
        TDPO1: u = h - (SeqKL(y_l) - SeqKL(y_w))
        TDPO2: u = h - alpha (SeqKL(y_l) - stopgrad(SeqKL(y_w)))
        loss  = -log sigma(beta u)

    Args: [B] summed log-probs and [B] sequence KLs. Returns losses [B], chosen_rewards [B],
    rejected_rewards [B] (beta (L_theta - L_ref), detached)."""
    h = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    if if_tdpo2:
        u = h - alpha * (rejected_kl - chosen_kl.detach())
    else:
        u = h - (rejected_kl - chosen_kl)
    losses = -F.logsigmoid(beta * u)
    return (losses, beta * (policy_chosen_logps - reference_chosen_logps).detach(),
            beta * (policy_rejected_logps - reference_rejected_logps).detach())


def _validate_tdpo(cfg):
    require(cfg, "beta", positive=True)
    require(cfg, "alpha", nonnegative=True)


@register("tdpo", reference="logits", validate=_validate_tdpo)
def _tdpo(inp: LossInputs, cfg):
    pol_tok, ref_tok, kl_tok = tdpo_token_terms(inp.reference_logits, inp.policy_logits, inp.labels)
    pol, ref, kl = (t.sum(-1) for t in (pol_tok, ref_tok, kl_tok))
    (pc, pr), (rc, rr), (kc, kr) = (split_pairs(t, inp.n_pairs) for t in (pol, ref, kl))
    losses, cr, rj = tdpo_loss(pc, pr, rc, rr, kc, kr, cfg.beta, cfg.alpha, cfg.get("if_tdpo2", True))
    metrics = preference_metrics(cr, rj, pc, pr)
    metrics.update({"kl/chosen": kc.detach(), "kl/rejected": kr.detach(), "kl/margin": (kr - kc).detach()})
    return losses.mean(), metrics


# ------------------------------------------------------------------ tvkd

TVKD_VARIANTS = ("paper", "released", "released_teacher_value")
TERMINAL_VALUES = ("teacher", "zero")
# psi_t = beta_T (log pi_T(y_t|s_t) - log pi_Tref(y_t|s_t)): the DPO teacher's per-token implicit
# reward against its own SFT model (teacher.reference_archive), as ddpo reads it
IMPLICIT_REWARD = "implicit_reward"
TVKD_POTENTIALS = STATE_POTENTIALS + ACTION_POTENTIALS + (IMPLICIT_REWARD,)


def tvkd_tau(cfg) -> float:
    tau = cfg.get("value_temperature")
    return float(cfg.beta if tau is None else tau)


def tvkd_shaping(values_cur: torch.Tensor, values_next: torch.Tensor, mask: torch.Tensor, gamma: float,
                 terminal_value: str = "teacher") -> torch.Tensor:
    """Per-token potential-based shaping psi_t = gamma V(s_{t+1}) - V(s_t) (Ng et al. 1999).

    Args: values_cur, values_next [N, T] (shifted: V(s_t), V(s_{t+1})); mask [N, T];
    terminal_value: "teacher" keeps the teacher's V(s_{T+1}), "zero" sets it to 0
    (the terminal potential of episodic shaping). Returns [N, T] psi, zero off the response."""
    if terminal_value == "zero":
        values_next = values_next * (1.0 - last_token_mask(mask))
    return (gamma * values_next - values_cur) * mask


def tvkd_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, mask: torch.Tensor,
              psi_sum: torch.Tensor, n_pairs: int, beta: float, alpha: float):
    """TVKD (Kwon et al., NeurIPS 2025, Eq. for L_TVKD): DPO with the reward shaped by alpha psi.

        g(y) = beta sum_t m_t (l_theta,t - l_ref,t) - alpha sum_t m_t psi_t
        loss = -log sigma( g(y_w) - g(y_l) )

    Args: policy_logps, reference_logps, mask: [2B, T] (chosen rows first); psi_sum [2B]: the
    teacher's sum_t m_t psi_t per response (`_tvkd_sequence`, on the teacher's own tokens if its
    tokenizer differs). Returns losses [B], shaping [2B] (alpha sum_t m_t psi_t)."""
    g_dpo = beta * ((policy_logps - reference_logps) * mask).sum(-1)
    shaping = alpha * psi_sum
    g = g_dpo - shaping
    g_w, g_l = split_pairs(g, n_pairs)
    return -F.logsigmoid(g_w - g_l), shaping


def _tvkd_teacher_features(teacher_logits: torch.Tensor, labels: torch.LongTensor, cfg) -> Dict[str, torch.Tensor]:
    """Reduce the teacher's [N, L, V] logits to what TVKD reads:
    paper variant -- `values` [N, L] (the chosen state potential at every position; for the
    action potentials, the logsumexp value, for the metrics) and, for logit/logprob, `psi`
    [N, L-1] per token; released variants -- `topk_ids` [N, L, k] and `teacher_collapsed`
    [N, L, k+1] (the latter only for released_teacher_value: the entropy branch reads only
    the ids)."""
    variant = cfg.get("variant", "paper")
    if variant != "paper":
        ids = teacher_topk_ids(teacher_logits, cfg.get("top_k", 50), "top_k")
        if variant == "released":
            return {"topk_ids": ids}
        return {"topk_ids": ids, "teacher_collapsed": chunked(collapse_topk, teacher_logits, ids)}
    potential, tau = cfg.get("potential", "logsumexp"), tvkd_tau(cfg)
    state_kind = potential if potential in STATE_POTENTIALS else "logsumexp"
    out = {"values": chunked(lambda z: state_potential(z, state_kind, tau).unsqueeze(-1), teacher_logits).squeeze(-1)}
    if potential == IMPLICIT_REWARD:  # psi needs the teacher's reference: _tvkd_teacher_reference_features
        out["teacher_logps"] = chunked_token_logps(teacher_logits, labels)
    elif potential in ACTION_POTENTIALS:
        tokens = shifted_targets(labels).unsqueeze(-1)
        out["psi"] = chunked(lambda z, a: action_potential(z, a.squeeze(-1), potential).unsqueeze(-1),
                             teacher_logits[:, :-1], tokens).squeeze(-1)
    return out


def _tvkd_teacher_reference_features(teacher_reference_logits, labels, cfg, teacher) -> Dict[str, torch.Tensor]:
    """potential=implicit_reward: psi [N, L-1] = beta_T (log pi_T - log pi_Tref) of each response
    token, from the teacher's log-probs and its reference's logits (the teacher's log-probs are
    consumed: the cache holds psi)."""
    teacher = dict(teacher)
    ref = chunked_token_logps(teacher_reference_logits, labels)
    teacher["psi"] = float(cfg.teacher_beta) * (teacher.pop("teacher_logps") - ref)
    return teacher


def _tvkd_reads_teacher_reference(cfg) -> bool:
    return cfg.get("variant", "paper") == "paper" and cfg.get("potential", "logsumexp") == IMPLICIT_REWARD


def _tvkd_sequence(teacher: Dict[str, torch.Tensor], mask: torch.Tensor, cfg) -> Dict[str, torch.Tensor]:
    """The paper variant's teacher signal per response from its features and the mask [N, L-1] of
    their rows: `psi_sum` = sum_t m_t psi_t [N], `final_value` = V(s_{T+1}) [N] (logged)."""
    v_cur, v_next = gather_next(teacher["values"])
    if "psi" in teacher:
        psi = teacher["psi"] * mask
    else:
        psi = tvkd_shaping(v_cur, v_next, mask, cfg.gamma, cfg.get("terminal_value", "teacher"))
    return {"psi_sum": (psi * mask).sum(-1), "final_value": (v_next * last_token_mask(mask)).sum(-1)}


def _tvkd_sequence_problem(cfg) -> Optional[str]:
    return None if cfg.get("variant", "paper") == "paper" else (
        f"loss.variant={cfg.get('variant')} collapses the student's distribution onto the teacher's top-k token ids "
        "at each student token (a per-token signal in one vocabulary)")


def _validate_tvkd(cfg):
    require(cfg, "alpha", nonnegative=True)
    require(cfg, "beta", positive=True)
    require(cfg, "gamma", nonnegative=True)
    require(cfg, "variant", choices=TVKD_VARIANTS)
    require(cfg, "potential", choices=TVKD_POTENTIALS)
    if cfg.get("potential") == IMPLICIT_REWARD:
        require(cfg, "teacher_beta", positive=True)
    require(cfg, "terminal_value", choices=TERMINAL_VALUES)
    tau = cfg.get("value_temperature")
    if tau is not None and not tau > 0:
        raise ValueError(f"loss.value_temperature must be > 0 (or null = beta), got {tau}")
    if cfg.get("variant") != "paper":
        require(cfg, "top_k", positive=True)


def _tvkd_feature_settings(cfg) -> Dict:
    """What `_tvkd_teacher_features` depends on: the variant and its top-k, or the potential and
    the resolved value temperature (null means loss.beta)."""
    variant = cfg.get("variant", "paper")
    if variant != "paper":
        return {"variant": variant, "top_k": int(cfg.get("top_k", 50))}
    out = {"variant": variant, "potential": cfg.get("potential", "logsumexp"), "value_temperature": tvkd_tau(cfg)}
    return {**out, "teacher_beta": float(cfg.teacher_beta)} if out["potential"] == IMPLICIT_REWARD else out


def _tvkd_reference(cfg):
    return "logps" if cfg.get("variant", "paper") == "paper" and cfg.get("use_reference", True) else None


@register("tvkd", reference=_tvkd_reference, teacher_features=_tvkd_teacher_features, validate=_validate_tvkd,
          teacher_reference_features=_tvkd_teacher_reference_features, teacher_reference=_tvkd_reads_teacher_reference,
          teacher_feature_settings=_tvkd_feature_settings, check_vocab=check_top_k_vocab,
          sequence_teacher=_tvkd_sequence, sequence_teacher_problem=_tvkd_sequence_problem)
def _tvkd(inp: LossInputs, cfg):
    pol = sequence_logps(inp.policy_logps, inp.mask)
    variant = cfg.get("variant", "paper")
    if variant != "paper":
        t = inp.teacher
        check_teacher_vocab(t, inp.policy_logits)
        student = chunked(collapse_topk, inp.policy_logits, t["topk_ids"], grad=True)
        r, x = released_rewards(student, t.get("teacher_collapsed"), t["topk_ids"], inp.labels, cfg.gamma,
                                "entropy" if variant == "released" else "teacher_value",
                                cfg.get("released_alpha0", 0.7), cfg.get("released_alpha1", 0.0),
                                cfg.get("released_alpha_tilde", 1.0), return_terms=True)
        r_w, r_l = split_pairs(r, inp.n_pairs)
        losses = -F.logsigmoid(r_w - r_l)
        # rewards/* are R(y) itself (this recipe has no beta and no reference)
        metrics = preference_metrics(r_w, r_l, *split_pairs(pol, inp.n_pairs))
        xw, xl = split_pairs(x, inp.n_pairs)
        metrics.update({"shaping/chosen": xw.detach(), "shaping/rejected": xl.detach(),
                        "shaping/margin": (xw - xl).detach()})
        return losses.mean(), metrics
    ref_logps = inp.reference_logps if inp.reference_logps is not None else torch.zeros_like(inp.policy_logps)
    seq = teacher_sequence(inp, _tvkd_sequence, cfg)
    losses, shaping = tvkd_loss(inp.policy_logps, ref_logps, inp.mask, seq["psi_sum"], inp.n_pairs, cfg.beta,
                                cfg.alpha)
    ref = sequence_logps(ref_logps, inp.mask)
    (pc, pr), (rc, rr) = split_pairs(pol, inp.n_pairs), split_pairs(ref, inp.n_pairs)
    metrics = preference_metrics(cfg.beta * (pc - rc), cfg.beta * (pr - rr), pc, pr)
    (vw, vl), (sw, sl) = split_pairs(seq["final_value"], inp.n_pairs), split_pairs(shaping, inp.n_pairs)
    metrics.update({"value/chosen_last": vw.detach(), "value/rejected_last": vl.detach(),
                    "shaping/chosen": sw.detach(), "shaping/rejected": sl.detach(),
                    "shaping/margin": (sw - sl).detach()})
    return losses.mean(), metrics


# ------------------------------------------------------------------ knowledge distillation

def _kd_teacher_features(teacher_logits: torch.Tensor, labels: torch.LongTensor, cfg) -> Dict[str, torch.Tensor]:
    """Full vocabulary (top_k null): the teacher's log-probs, one [N, L, V] tensor.
    top_k K: `topk_ids` [N, L, K] and `teacher_collapsed` [N, L, K+1] only."""
    k = cfg.get("top_k")
    if k is None:
        if isinstance(teacher_logits, LazyLogits):  # projected chunk by chunk where the loss reads it
            return {"teacher_logp": teacher_logits.map(log_softmax_f32)}
        return {"teacher_logp": chunked(log_softmax_f32, teacher_logits)}
    ids = teacher_topk_ids(teacher_logits, k, "top_k")
    return {"topk_ids": ids, "teacher_collapsed": chunked(collapse_topk, teacher_logits, ids)}


def _kd_feature_settings(cfg) -> Dict:
    """What `_kd_teacher_features` depends on."""
    return {"top_k": cfg.get("top_k")}


def _kd_vocab_sized(cfg) -> Tuple[str, ...]:
    """Full-vocabulary KD (top_k null) reads the teacher's whole log-softmax: not cacheable."""
    return ("teacher_logp",) if cfg.get("top_k") is None else ()


def _kd_cache_hint(cfg) -> Optional[str]:
    return "set loss.top_k=K to distil on the teacher's top-K (cacheable)" if cfg.get("top_k") is None else None


# What the top-K / full-vocabulary KD losses declare (feature settings, cacheability, top_k's old name)
KD_TOP_K = dict(teacher_feature_settings=_kd_feature_settings, vocab_sized_features=_kd_vocab_sized,
                cache_hint=_kd_cache_hint, check_vocab=check_top_k_vocab, renamed={"teacher_top_k": "top_k"})


def kd_loss(nll: torch.Tensor, fkl: torch.Tensor, sft_weight: float, kd_weight: float) -> torch.Tensor:
    """VanillaKD: sft_weight NLL(y_w) + kd_weight FKL(p_T || pi_theta) on y_w, both per-token
    means over the response. Args/returns: [B]."""
    return sft_weight * nll + kd_weight * fkl


def dckd_loss(nll_w: torch.Tensor, fkl_w: torch.Tensor, fkl_l: torch.Tensor, lam: float) -> torch.Tensor:
    """DCKD (Gao et al., ICLR 2025): NLL(y_w) + lambda FKL on y_w + lambda FKL on y_l, per-token
    means over each response. Args/returns: [B]."""
    return nll_w + lam * (fkl_w + fkl_l)


def _validate_kd(cfg, weights):
    for w in weights:
        require(cfg, w, nonnegative=True)
    k = cfg.get("top_k")
    if k is not None and not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise ValueError(f"loss.top_k must be a whole number >= 1 or null (full vocabulary), got {k!r}")


@register("vanillakd", pairwise=False, teacher_features=_kd_teacher_features, **KD_TOP_K,
          validate=lambda cfg: _validate_kd(cfg, ("kd_weight", "sft_weight")))
def _vanillakd(inp: LossInputs, cfg):
    nll = sft_loss(inp.policy_logps, inp.mask)
    fkl = sequence_logps(token_fkl(inp), inp.mask, average=True)
    losses = kd_loss(nll, fkl, cfg.sft_weight, cfg.kd_weight)
    return losses.mean(), {"kd/fkl": fkl.detach(), "kd/nll": nll.detach(),
                           "logps/chosen": sequence_logps(inp.policy_logps, inp.mask).detach()}


@register("dckd", teacher_features=_kd_teacher_features, **KD_TOP_K,
          validate=lambda cfg: _validate_kd(cfg, ("lam",)))
def _dckd(inp: LossInputs, cfg):
    nll_w, _ = split_pairs(sft_loss(inp.policy_logps, inp.mask), inp.n_pairs)
    fkl_w, fkl_l = split_pairs(sequence_logps(token_fkl(inp), inp.mask, average=True), inp.n_pairs)
    losses = dckd_loss(nll_w, fkl_w, fkl_l, cfg.lam)
    pc, pr = split_pairs(sequence_logps(inp.policy_logps, inp.mask), inp.n_pairs)
    return losses.mean(), {"kd/fkl_chosen": fkl_w.detach(), "kd/fkl_rejected": fkl_l.detach(),
                           "kd/nll": nll_w.detach(), "logps/chosen": pc.detach(), "logps/rejected": pr.detach()}


# ================================================================== Table 1 baselines
# simpo, wpo (preference losses), ddpo, dpkd, gkd (teacher losses), seqkd and adpa (trained on
# generated responses); each declares what it needs in its LossSpec.


# ------------------------------------------------------------------ simpo

def simpo_loss(policy_chosen_avg_logps: torch.Tensor, policy_rejected_avg_logps: torch.Tensor,
               beta: float, gamma: float):
    """SimPO (Meng et al. 2024, Eq. 6): length-normalised reward, no reference, target margin gamma.

        r(y) = beta / |y| * L_theta(y)                  (L_theta(y) = sum_t m_t l_theta,t)
        loss = -log sigma( r(y_w) - r(y_l) - gamma )

    Args:
        policy_*_avg_logps: [B] per-token averages L_theta(y) / |y| over response tokens.
        beta: reward scale; gamma: target reward margin.
    Returns:
        losses [B], chosen_rewards [B], rejected_rewards [B] (r(y), detached)."""
    chosen_rewards = beta * policy_chosen_avg_logps
    rejected_rewards = beta * policy_rejected_avg_logps
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def _validate_simpo(cfg):
    require(cfg, "beta", positive=True)
    require(cfg, "gamma")


@register("simpo", reference=None, validate=_validate_simpo)
def _simpo(inp: LossInputs, cfg):
    pc_avg, pr_avg = split_pairs(sequence_logps(inp.policy_logps, inp.mask, average=True), inp.n_pairs)
    losses, cr, rj = simpo_loss(pc_avg, pr_avg, cfg.beta, cfg.gamma)
    pc, pr = split_pairs(sequence_logps(inp.policy_logps, inp.mask), inp.n_pairs)
    return losses.mean(), preference_metrics(cr, rj, pc, pr)


# ------------------------------------------------------------------ wpo


def wpo_weights(policy_logps: torch.Tensor, log_sum_sq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WPO's sequence weight (Zhou et al. 2024, the TRL `use_weighting` form), without grad:

        w(y) = exp( mean_t [ l_theta,t - log sum_v pi_theta(v|s_t)^2 ] )     (mean over response tokens)

    Args: policy_logps, log_sum_sq, mask: [N, T]. Returns [N] weights (detached)."""
    return torch.exp(sequence_logps((policy_logps - log_sum_sq).detach(), mask, average=True))


def wpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             chosen_weights: torch.Tensor, rejected_weights: torch.Tensor, beta: float):
    """WPO: DPO's loss of each pair weighted by the (detached) product of its sequence weights.

        loss = min(1, w(y_w) w(y_l)) * ( -log sigma(beta h) )

    Args: [B] summed log-probs and [B] weights. With unit weights this is DPO exactly.
    Returns losses [B], chosen_rewards [B], rejected_rewards [B], pair weights [B]."""
    dpo, cr, rj = dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                           reference_rejected_logps, beta)
    weight = (chosen_weights * rejected_weights).clamp(max=1.0).detach()
    return weight * dpo, cr, rj, weight


@register("wpo", reference="logps", validate=lambda cfg: require(cfg, "beta", positive=True))
def _wpo(inp: LossInputs, cfg):
    logps = inp.policy_logps  # computed (and cached) with grad, outside the no_grad block below
    with torch.no_grad():
        lss = chunked(lambda z: log_sum_squared_probs(z).unsqueeze(-1), inp.policy_logits[:, :-1].detach())
        w = wpo_weights(logps, lss.squeeze(-1), inp.mask)
    pc, pr, rc, rr = pair_logps(inp)
    wc, wr = split_pairs(w, inp.n_pairs)
    losses, cr, rj, weight = wpo_loss(pc, pr, rc, rr, wc, wr, cfg.beta)
    metrics = preference_metrics(cr, rj, pc, pr)
    metrics.update({"wpo/weight": weight, "wpo/chosen_weight": wc, "wpo/rejected_weight": wr})
    return losses.mean(), metrics


# ------------------------------------------------------------------ seqkd

def seqkd_loss(policy_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SeqKD (Kim & Rush 2016): the SFT loss on the teacher's own responses y_T to the training prompts.

        loss(x) = -1/|y_T| sum_t log pi_theta(y_T,t | x, y_T,<t)

    Args: policy_logps [B, T] per-token log-probs of the teacher-generated responses; mask [B, T].
    Returns [B] per-example mean NLL."""
    return sft_loss(policy_logps, mask)


def _seqkd_generation(cfg) -> Generation:
    return Generation("teacher", "chosen", temperature=cfg.get("temperature"), num_beams=cfg.get("num_beams", 1),
                      max_new_tokens=cfg.get("max_new_tokens"))


@register("seqkd", pairwise=False, sft_targets=True, generation=_seqkd_generation, validate=validate_generation)
def _seqkd(inp: LossInputs, cfg):
    losses = seqkd_loss(inp.policy_logps, inp.mask)
    return losses.mean(), {"kd/nll": losses.detach(),
                           "logps/chosen": sequence_logps(inp.policy_logps, inp.mask).detach(),
                           "kd/response_length": inp.mask.sum(-1)}


# ------------------------------------------------------------------ ddpo

def teacher_implicit_rewards(teacher_logps: torch.Tensor, teacher_reference_logps: torch.Tensor,
                             mask: torch.Tensor, teacher_beta: float) -> torch.Tensor:
    """r_T(y) = beta_T (L_teacher(y) - L_teacher_ref(y)): the DPO teacher's implicit reward against
    its own SFT reference. Args: [N, T] per-token log-probs and mask. Returns [N]."""
    return teacher_beta * ((teacher_logps - teacher_reference_logps) * mask).sum(-1)


def ddpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
              teacher_chosen_rewards: torch.Tensor, teacher_rejected_rewards: torch.Tensor, beta: float):
    """Distilled DPO (Fisch et al. 2024): regress the student's implicit reward margin on the teacher's.

        h    = [L_theta(y_w) - L_ref(y_w)] - [L_theta(y_l) - L_ref(y_l)]
        loss = ( beta h - [r_T(y_w) - r_T(y_l)] )^2

    Args: [B] summed log-probs of the policy and its reference, [B] teacher rewards r_T.
    Returns losses [B], chosen_rewards [B], rejected_rewards [B] (beta (L_theta - L_ref), detached).
    The loss is 0 exactly where the student's margin equals the teacher's."""
    chosen = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected = beta * (policy_rejected_logps - reference_rejected_logps)
    losses = ((chosen - rejected) - (teacher_chosen_rewards - teacher_rejected_rewards)) ** 2
    return losses, chosen.detach(), rejected.detach()


def _ddpo_teacher_features(teacher_logits, labels, cfg):
    return {"teacher_logps": chunked_token_logps(teacher_logits, labels)}


def _ddpo_teacher_reference_features(teacher_reference_logits, labels, cfg, teacher):
    return {**teacher, "teacher_reference_logps": chunked_token_logps(teacher_reference_logits, labels)}


def _ddpo_sequence(teacher: Dict[str, torch.Tensor], mask: torch.Tensor, cfg) -> Dict[str, torch.Tensor]:
    """r_T(y) [N] per response from the teacher's and its reference's log-probs (mask [N, L-1])."""
    return {"teacher_rewards": teacher_implicit_rewards(teacher["teacher_logps"], teacher["teacher_reference_logps"],
                                                        mask, cfg.teacher_beta)}


def _validate_ddpo(cfg):
    require(cfg, "beta", positive=True)
    require(cfg, "teacher_beta", positive=True)


@register("ddpo", reference="logps", teacher_features=_ddpo_teacher_features,
          teacher_reference_features=_ddpo_teacher_reference_features, validate=_validate_ddpo,
          teacher_feature_settings=lambda cfg: {},  # per-token log-probs of both teacher models only
          sequence_teacher=_ddpo_sequence)
def _ddpo(inp: LossInputs, cfg):
    pc, pr, rc, rr = pair_logps(inp)
    tc, tr = split_pairs(teacher_sequence(inp, _ddpo_sequence, cfg)["teacher_rewards"], inp.n_pairs)
    losses, cr, rj = ddpo_loss(pc, pr, rc, rr, tc, tr, cfg.beta)
    metrics = preference_metrics(cr, rj, pc, pr)
    metrics.update({"teacher_rewards/chosen": tc.detach(), "teacher_rewards/rejected": tr.detach(),
                    "teacher_rewards/margins": (tc - tr).detach(),
                    "teacher_rewards/accuracies": (tc > tr).float().detach()})
    return losses.mean(), metrics


# ------------------------------------------------------------------ dpkd

def dpkd_margins(policy_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """DPKD's per-state margin (Li et al. 2024), position-wise over the last dim:

        a_T = argmax_a p_T(a|s),  a_S = argmax_a pi_theta(a|s)   (a_S: no gradient through the argmax)
        h   = [log pi_theta(a_T) - log pi_theta(a_S)] - [log p_T(a_T) - log p_T(a_S)]

    Args: policy_logp, teacher_logp [..., V] log-probs. Returns [...]. h = 0 where a_T = a_S."""
    a_t = teacher_logp.argmax(-1, keepdim=True)
    a_s = policy_logp.detach().argmax(-1, keepdim=True)
    pick = lambda lp, a: torch.gather(lp, -1, a).squeeze(-1)
    return (pick(policy_logp, a_t) - pick(policy_logp, a_s)) - (pick(teacher_logp, a_t) - pick(teacher_logp, a_s))


def dpkd_loss(policy_logps: torch.Tensor, margins: torch.Tensor, mask: torch.Tensor, beta: float,
              kd_ratio: float) -> torch.Tensor:
    """DPKD: (1 - kd_ratio) NLL(y_w) + kd_ratio * mean_t -log sigma(beta h_t).

    Args: policy_logps [B, T] per-token log pi_theta(y_t|s_t) of y_w; margins [B, T] the h_t at the
    states of y_w; mask [B, T]. Returns [B]; with kd_ratio = 0 it is the SFT loss."""
    nll = sft_loss(policy_logps, mask)
    pref = sequence_logps(-F.logsigmoid(beta * margins), mask, average=True)
    return (1.0 - kd_ratio) * nll + kd_ratio * pref


def _full_teacher_logp(teacher_logits, labels, cfg):
    """The teacher's full log-softmax [N, L, V] (exact for losses that read the teacher at a token
    chosen by the student, which is unknown when the teacher runs)."""
    if isinstance(teacher_logits, LazyLogits):
        return {"teacher_logp": teacher_logits.map(log_softmax_f32)}
    return {"teacher_logp": chunked(log_softmax_f32, teacher_logits)}


def _validate_dpkd(cfg):
    require(cfg, "beta", positive=True)
    ratio = require(cfg, "kd_ratio")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"loss.kd_ratio must be in [0, 1], got {ratio}")


@register("dpkd", pairwise=False, teacher_features=_full_teacher_logp, validate=_validate_dpkd,
          vocab_sized_features=lambda cfg: ("teacher_logp",))
def _dpkd(inp: LossInputs, cfg):
    check_teacher_vocab(inp.teacher, inp.policy_logits)
    h = chunked(lambda pl, tl: dpkd_margins(torch.log_softmax(pl.float(), -1), tl).unsqueeze(-1),
                inp.policy_logits[:, :-1], inp.teacher["teacher_logp"][:, :-1], grad=True).squeeze(-1) * inp.mask
    losses = dpkd_loss(inp.policy_logps, h, inp.mask, cfg.beta, cfg.kd_ratio)
    with torch.no_grad():
        agree = chunked(lambda pl, tl: (pl.argmax(-1) == tl.argmax(-1)).float().unsqueeze(-1),
                        inp.policy_logits[:, :-1].detach(), inp.teacher["teacher_logp"][:, :-1]).squeeze(-1)
    return losses.mean(), {"kd/nll": sft_loss(inp.policy_logps, inp.mask).detach(),
                           "kd/margin": sequence_logps(h.detach(), inp.mask, average=True),
                           "kd/argmax_agreement": sequence_logps(agree, inp.mask, average=True),
                           "logps/chosen": sequence_logps(inp.policy_logps, inp.mask).detach()}


# ------------------------------------------------------------------ gkd


def gkd_loss(token_jsd: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GKD: the per-token JSD_b(p_T || pi_theta)(s_t) averaged over each response's tokens (the
    data's y_w, or with probability lambda a response sampled from the student).

    Args: token_jsd [B, T]; mask [B, T]. Returns [B]."""
    return sequence_logps(token_jsd, mask, average=True)


def _gkd_generation(cfg) -> Optional[Generation]:
    lam = cfg.get("lam", 0.0) or 0.0
    if lam <= 0:
        return None
    return Generation("policy", "chosen", probability=float(lam), temperature=cfg.temperature,
                      max_new_tokens=cfg.get("max_new_tokens"), train_only=True)


def _gkd_cache_hint(cfg) -> Optional[str]:
    if (cfg.get("lam", 0.0) or 0.0) > 0:
        return "set loss.lam=0 (no on-policy samples)"
    return _kd_cache_hint(cfg)


def _validate_gkd(cfg):
    for key in ("b", "lam"):
        v = require(cfg, key)
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"loss.{key} must be in [0, 1], got {v}")
    _validate_kd(cfg, ())
    validate_generation(cfg, sampled=cfg.lam > 0)


@register("gkd", pairwise=False, teacher_features=_kd_teacher_features, generation=_gkd_generation,
          validate=_validate_gkd, **{**KD_TOP_K, "cache_hint": _gkd_cache_hint})
def _gkd(inp: LossInputs, cfg):
    b = float(cfg.b)
    losses = gkd_loss(token_divergence(inp, lambda tl, sl: generalized_jsd(tl, sl, b)), inp.mask)
    return losses.mean(), {"kd/jsd": losses.detach(),
                           "logps/chosen": sequence_logps(inp.policy_logps, inp.mask).detach()}


# ------------------------------------------------------------------ adpa

def expected_advantage(policy_logp: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """sum_a pi_theta(a|s) A(s, a), position-wise over the last dim: [..., K] log-probs and advantages -> [...]."""
    return (policy_logp.exp() * advantage).sum(-1)


def adpa_loss(policy_logps_w: torch.Tensor, mask_w: torch.Tensor, expected_adv_s: torch.Tensor,
              mask_s: torch.Tensor, w: float) -> torch.Tensor:
    """ADPA (Gao et al., ICLR 2025), advantage-guided distillation:

        A(s, a) = log pi_dpo_teacher(a|s) - log pi_sft_teacher(a|s)
        loss    = NLL(y_w) - w * mean_t sum_a pi_theta(a|s_t) A(s_t, a)      (t over the student's y_s)

    Args:
        policy_logps_w [B, T], mask_w [B, T]: per-token log pi_theta of the chosen response y_w.
        expected_adv_s [B, T'], mask_s [B, T']: sum_a pi_theta(a|s_t) A(s_t, a) at the states of the
            student-generated response y_s (from `expected_advantage`).
        w: weight of the advantage term.
    Returns [B]."""
    return sft_loss(policy_logps_w, mask_w) - w * sequence_logps(expected_adv_s, mask_s, average=True)


def _generated_rows(t: torch.Tensor) -> torch.Tensor:
    """ADPA's rows [B, 2B) (the student's responses y_s; rows [0, B) hold y_w)."""
    return t[t.shape[0] // 2:]


def _adpa_teacher_features(teacher_logits, labels, cfg):
    """The DPO teacher on y_s only: its full log-softmax, or with top_k K its top-K ids and
    collapsed log-probs (both [B, L, .])."""
    return _kd_teacher_features(_generated_rows(teacher_logits), _generated_rows(labels), cfg)


def _adpa_teacher_reference_features(teacher_reference_logits, labels, cfg, teacher):
    """A(s, a) on y_s from the SFT teacher's logits: `advantage` [B, L, V] (written in place over the
    DPO teacher's log-probs, so one full-size tensor), or [B, L, K+1] with `topk_ids`."""
    ref = _generated_rows(teacher_reference_logits)
    if "topk_ids" in teacher:
        ids = teacher["topk_ids"]
        return {"topk_ids": ids, "advantage": teacher["teacher_collapsed"] - chunked(collapse_topk, ref, ids)}
    adv = teacher.pop("teacher_logp")
    if adv.shape[-1] != ref.shape[-1]:
        raise ValueError(f"the DPO teacher has {adv.shape[-1]} logits per position and its SFT reference "
                         f"(teacher.reference_archive) {ref.shape[-1]}: they must share one vocabulary")
    if isinstance(adv, LazyLogits) and isinstance(ref, LazyLogits):  # both chunked output layers
        return {"advantage": LazyLogits.combine(lambda a, r: a - log_softmax_f32(r), adv, ref)}
    adv, ref = (x.materialize() if isinstance(x, LazyLogits) else x for x in (adv, ref))
    c = chunk_positions(adv.shape[0], adv.shape[-1])
    for i in range(0, adv.shape[1], c):
        adv[:, i:i + c] -= torch.log_softmax(ref[:, i:i + c].float(), -1)
    return {"advantage": adv}


def _adpa_generation(cfg) -> Generation:
    return Generation("reference", "rejected", temperature=cfg.get("temperature"),
                      max_new_tokens=cfg.get("max_new_tokens"))


def _validate_adpa(cfg):
    require(cfg, "w", nonnegative=True)
    _validate_kd(cfg, ())
    validate_generation(cfg)


@register("adpa", teacher_features=_adpa_teacher_features, teacher_reference_features=_adpa_teacher_reference_features,
          generation=_adpa_generation, validate=_validate_adpa, check_vocab=check_top_k_vocab,
          renamed={"teacher_top_k": "top_k"})
def _adpa(inp: LossInputs, cfg):
    B, t = inp.n_pairs, inp.teacher
    pol_s = inp.policy_logits[B:, :-1]
    if "topk_ids" in t:
        check_teacher_vocab(t, inp.policy_logits)
        per = chunked(lambda pl, a, ids: expected_advantage(collapse_topk(pl, ids), a).unsqueeze(-1),
                      pol_s, t["advantage"][:, :-1], t["topk_ids"][:, :-1], grad=True)
    else:
        if t["advantage"].shape[-1] != inp.policy_logits.shape[-1]:
            raise ValueError(f"the teacher's logits have {t['advantage'].shape[-1]} entries per position and the "
                             f"student's {inp.policy_logits.shape[-1]}: ADPA over the full vocabulary needs one "
                             "vocabulary (or set loss.top_k)")
        per = chunked(lambda pl, a: expected_advantage(torch.log_softmax(pl.float(), -1), a).unsqueeze(-1),
                      pol_s, t["advantage"][:, :-1], grad=True)
    mask_w, mask_s = split_pairs(inp.mask, B)
    adv = per.squeeze(-1) * mask_s
    logps_w, logps_s = split_pairs(inp.policy_logps, B)
    losses = adpa_loss(logps_w, mask_w, adv, mask_s, cfg.w)
    return losses.mean(), {"kd/nll": sft_loss(logps_w, mask_w).detach(),
                           "kd/advantage": sequence_logps(adv.detach(), mask_s, average=True),
                           "kd/generated_length": mask_s.sum(-1),
                           "logps/chosen": sequence_logps(logps_w, mask_w).detach(),
                           "logps/generated": sequence_logps(logps_s, mask_s).detach()}


# ------------------------------------------------------------------ reward model (Bradley-Terry)

def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Bradley-Terry reward-model loss with an optional centring penalty:

        loss = -log sigma( r(x, y_w) - r(x, y_l) ) + c (r(x, y_w) + r(x, y_l))^2

    Args: chosen_rewards, rejected_rewards [B] scalar-head outputs; center_coef c >= 0.
    Returns: [B] per-pair losses."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards) + center_coef * (chosen_rewards + rejected_rewards) ** 2


@register("rm", head="scalar", validate=lambda cfg: require(cfg, "center_coef", nonnegative=True))
def _rm(inp: LossInputs, cfg):
    r = inp.policy_logits[:, 0].float()
    chosen, rejected = split_pairs(r, inp.n_pairs)
    return bradley_terry_loss(chosen, rejected, float(cfg.center_coef)).mean(), reward_metrics(chosen, rejected)

