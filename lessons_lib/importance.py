"""Importance criteria: which weights (or channels) matter. Seven families, one contract.

The course keeps three steps apart (see ``prune.py``): a *criterion* (this module) scores weights,
``prune`` turns scores into masks, ``surgery`` removes channels::

    scores = importance.score("fisher", model, batches, F.cross_entropy)   # the one entry point
    scores = importance.fisher(model, batches, F.cross_entropy)            # the same, by function
    masks = prune.global_masks(scores, 0.5)
    keep = prune.channel_masks(importance.reduce(scores, "l2"), 0.25)      # structured

The contract, the same for every criterion:

- Inputs: ``model``; ``batches``, an iterable of ``(inputs, targets)`` pairs, read once (pass a
  list to score twice on the same data); ``loss_fn(outputs, targets)``, the *mean* loss of a batch,
  a scalar (``F.cross_entropy``). Data-free criteria (``l1``, ``l2``, ``random``) ignore both;
  ``activation`` and ``apoz`` ignore ``loss_fn`` and the targets. ``names``: the parameters to
  score, default ``prune.prunable_weights(model)`` (every Linear/Conv weight).
- Output: ``{parameter name: scores}``, detached, on the model's device, shaped like the weight, or
  ``(C_out,)`` for the structured criteria (``activation``, ``apoz``) and after :func:`reduce`.
  Higher = more important (``prune.global_masks`` and ``prune.channel_masks`` prune the lowest).
- No side effects. The model runs in eval mode: dropout off, so scores are deterministic, and
  BatchNorm on its running statistics, which it then does not update and with which per-sample
  gradients (``vmap``) are well defined. Every module's train/eval flag is restored afterwards.
  Gradients come from ``torch.func.functional_call`` on detached aliases of the weights and
  ``torch.autograd.grad``, never ``backward()``: no ``.grad`` is written or cleared (Torch-Pruning's
  importance classes accumulate into ``p.grad``), no weight or buffer changes, and the hooks of the
  activation criteria are removed even on error. Probes and random scores come from a
  ``torch.Generator`` seeded by ``seed``, so scoring twice gives bit-identical scores.
- Bad arguments raise ``ValueError`` before any batch is read.

Sources are cited in each function. The syllabus' source document (``seed/model-compression.zh.md``)
gets two formulas wrong; both are here, named as such, to be measured: :func:`fisher_batch_mean`
(squares the batch-mean gradient) and :func:`hessian_row_sums` (``grad(g.sum(), w)`` = H @ 1).
"""
from __future__ import annotations

import contextlib
import functools
import math
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import func, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lessons_lib import prune
from lessons_lib.checks import is_int, is_number, require

Scores = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CRITERIA = ("l1", "l2", "gradient", "taylor", "fisher", "fisher_batch_mean", "snip", "activation", "apoz",
            "hutchinson", "hessian_exact", "hessian_row_sums", "obd", "combined", "random")
DATA_FREE = ("l1", "l2", "random")
STRUCTURED = ("activation", "apoz")  # already one score per output channel / neuron
REDUCTIONS = ("l1", "l2", "sum", "taylor_group")
SCOPES = ("layer", "global")
SITES = ("output", "relu")
TAYLOR_FORMS = ("abs", "signed", "group")
HESSIANS = ("hutchinson", "exact")
# The source's evaluator (ComprehensiveImportanceEvaluator) and its default weights, in our names.
SOURCE_WEIGHTS = MappingProxyType({"l1": 0.3, "gradient": 0.3, "fisher": 0.2, "snip": 0.2})


# ----------------------------------------------------------------------------- checks and plumbing
def _weights(model: nn.Module, names: Iterable[str] | None) -> dict[str, torch.Tensor]:
    if names is None:
        return dict(prune.prunable_weights(model))
    require(isinstance(names, Iterable) and not isinstance(names, (str, torch.Tensor)),
            f"names must be a list of parameter names such as 'features.0.weight', got {names!r}")
    names, params = list(names), dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    require(bool(names) and not unknown, f"names: unknown parameter names {unknown[:5]}; accepted are names of "
                                         f"model.named_parameters(), e.g. {list(params)[:3]}")
    require(len(set(names)) == len(names), f"names repeats a parameter: {names}")
    return {n: params[n] for n in names}


def _check_data(batches: object, loss_fn: object, criterion: str, needs_loss: bool = True) -> None:
    require(isinstance(batches, Iterable) and not isinstance(batches, (torch.Tensor, str)),
            f"criterion {criterion!r} needs data: batches must be an iterable of (inputs, targets) pairs "
            f"(a list or a DataLoader), got {type(batches).__name__}")
    require(not needs_loss or callable(loss_fn),
            f"criterion {criterion!r} needs loss_fn(outputs, targets) -> the batch's mean loss "
            f"(e.g. F.cross_entropy), got {loss_fn!r}")


def _check_int(value: object, arg: str, low: int, hint: str) -> None:
    require(is_int(value) and value >= low, f"{arg} must be an int >= {low} ({hint}), got {value!r}")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pairs(batches: Iterable, device: torch.device, targets: bool = True) -> Iterator[tuple[torch.Tensor, Any]]:
    for batch in batches:
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
            x, y = batch
        elif not targets and isinstance(batch, torch.Tensor):
            x, y = batch, None
        else:
            raise ValueError(f"each batch must be an (inputs, targets) pair of tensors, got {type(batch).__name__}")
        yield x.to(device), (y.to(device) if isinstance(y, torch.Tensor) else y)


@contextlib.contextmanager
def _scoring(model: nn.Module) -> Iterator[None]:
    """Eval mode while scoring; then every module's own flag back (a model may mix modes)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _math_attention() -> contextlib.AbstractContextManager:
    """``scaled_dot_product_attention`` (what Hugging Face attention calls) on its math kernel, which
    computes the same attention from plain operations: the fused CPU and flash kernels have no double
    backward (Hessian-vector products differentiate the backward pass) and no vmap batching rule
    (per-sample gradients would fall back to a slow loop, with a warning)."""
    return sdpa_kernel([SDPBackend.MATH])


def _functional(model: nn.Module, loss_fn: LossFn) -> tuple[dict[str, torch.Tensor], Callable]:
    """The loss as a function of some tensors: ``loss_at({name: tensor}, x, y)``, every other parameter
    and buffer read detached from the model, which is never touched (``torch.func.functional_call``)."""
    frozen = {n: t.detach() for n, t in (*model.named_parameters(), *model.named_buffers())}

    def loss_at(overrides: Mapping[str, torch.Tensor], x: torch.Tensor, y: Any) -> torch.Tensor:
        loss = loss_fn(func.functional_call(model, {**frozen, **overrides}, (x,)), y)
        require(isinstance(loss, torch.Tensor) and loss.dim() == 0,
                "loss_fn must return the batch's mean loss, a scalar tensor (reduction='mean')")
        return loss

    return frozen, loss_at


def _leaves(frozen: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    return {n: frozen[n].detach().requires_grad_(True) for n in names}


def _batch_grads(model: nn.Module, batches: Iterable, loss_fn: LossFn, names: Iterable[str]) -> Iterator[dict]:
    """``{name: dL_b/dw}`` for each batch b, L_b its mean loss (call inside :func:`_scoring`)."""
    frozen, loss_at = _functional(model, loss_fn)
    for x, y in _pairs(batches, _device(model)):
        with torch.enable_grad():
            leaves = _leaves(frozen, names)
            grads = torch.autograd.grad(loss_at(leaves, x, y), list(leaves.values()), materialize_grads=True)
        yield dict(zip(leaves, grads))


def _average(per_batch: Iterable[Mapping[str, torch.Tensor]]) -> Scores:
    sums: Scores = {}
    count = 0
    for scores in per_batch:
        for n, s in scores.items():
            sums[n] = sums[n] + s if n in sums else s.clone()
        count += 1
    require(count > 0, "batches is empty: pass at least one (inputs, targets) batch")
    return {n: s / count for n, s in sums.items()}


# ----------------------------------------------------------------------------- 1. magnitude, and the baseline
def magnitude(model: nn.Module, batches: Iterable | None = None, loss_fn: LossFn | None = None, *,
              names: Iterable[str] | None = None, p: int = 1) -> Scores:
    """|w| (``p=1``, L1) or w^2 (``p=2``, L2): Han et al., "Learning both Weights and Connections for
    Efficient Neural Networks", arXiv:1506.02626. Element-wise the two rank identically (w^2 is a
    monotone function of |w|); they differ once grouped (``reduce(.., "sum")`` of |w| is Li et al.'s
    filter L1 norm, arXiv:1608.08710; of w^2, the squared L2 norm) or mixed with other criteria.
    Data-free: ``batches`` and ``loss_fn`` are ignored. Returns name -> scores shaped like the weight.
    """
    require(p in (1, 2) and is_int(p), f"p must be 1 (|w|) or 2 (w^2), got {p!r}")
    return {n: w.detach().abs() if p == 1 else w.detach().square() for n, w in _weights(model, names).items()}


def random(model: nn.Module, batches: Iterable | None = None, loss_fn: LossFn | None = None, *,
           names: Iterable[str] | None = None, seed: int = 0) -> Scores:
    """Uniform [0, 1) scores from a generator seeded by ``seed``: the baseline every table needs (a
    criterion that cannot beat it at some sparsity tells you nothing there). Data-free."""
    _check_int(seed, "seed", 0, "the generator's seed")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, w in _weights(model, names).items():
        dtype = w.dtype if w.is_floating_point() else torch.float32
        out[n] = torch.rand(w.shape, generator=g, dtype=torch.float64).to(w.device, dtype)
    return out


# ----------------------------------------------------------------------------- 2. gradient, Taylor
def gradient(model: nn.Module, batches: Iterable, loss_fn: LossFn, *, names: Iterable[str] | None = None) -> Scores:
    """mean_b |dL_b/dw|, L_b the mean loss of batch b: the source's gradient criterion. A large
    gradient says the loss is sensitive to w *near its current value*, not what removing it costs
    (that needs w: see :func:`taylor`)."""
    _check_data(batches, loss_fn, "gradient")
    weights = _weights(model, names)
    with _scoring(model):
        per_batch = _batch_grads(model, batches, loss_fn, weights)
        return _average({n: g.abs() for n, g in grads.items()} for grads in per_batch)


def taylor(model: nn.Module, batches: Iterable, loss_fn: LossFn, *, names: Iterable[str] | None = None,
           form: str = "abs", group_size: int = 1) -> Scores:
    """First-order Taylor importance (Molchanov et al., "Importance Estimation for Neural Network
    Pruning", arXiv:1906.10771): removing w changes the loss by about -g*w, so

    - ``form="abs"``: mean_b |g_b * w| per weight (the source's form; Molchanov et al. square it,
      (g*w)^2, which ranks the same within one batch);
    - ``form="signed"``: mean_b g_b * w, to combine into groups yourself (:func:`reduce`);
    - ``form="group"``: Molchanov et al.'s group criterion, mean_b (sum_{s in channel} g_b,s w_s)^2,
      one score per output channel (or per ``group_size`` consecutive channels, e.g. a head): (C_out / group_size,).

    The group is squared *per batch, then averaged*, as in the paper. Squaring the sum of the mean
    gradient instead (``reduce(taylor(.., form="signed"), "taylor_group")``) agrees for one batch, but
    near a minimum the mean gradient is ~0 and that score is mostly noise.
    """
    _check_data(batches, loss_fn, "taylor")
    require(form in TAYLOR_FORMS, f"form must be one of {TAYLOR_FORMS}, got {form!r}")
    _check_int(group_size, "group_size", 1, "output channels per group, 1 = each channel")
    weights = _weights(model, names)
    w = {n: p.detach() for n, p in weights.items()}
    if form == "group":
        _check_groups(w, group_size)

    def per_batch(grads: Mapping[str, torch.Tensor]) -> Scores:
        gw = {n: g * w[n] for n, g in grads.items()}  # shaped like each weight
        if form == "group":
            return reduce(gw, "taylor_group", group_size=group_size)  # (C_out / group_size,) per batch
        return {n: t.abs() for n, t in gw.items()} if form == "abs" else gw

    with _scoring(model):
        return _average(per_batch(grads) for grads in _batch_grads(model, batches, loss_fn, weights))


# ----------------------------------------------------------------------------- 3. Fisher
def _limit(max_samples: object) -> None:
    require(max_samples is None or (is_int(max_samples) and max_samples >= 1),
            f"max_samples must be None (all) or an int >= 1, got {max_samples!r}")


def _per_sample_sums(model: nn.Module, batches: Iterable, loss_fn: LossFn, names: Iterable[str],
                     max_samples: int | None, per_batch: Callable) -> tuple[Scores, int]:
    """Sum over batches of ``per_batch(frozen, loss_at, x, y)``, the last batch cut so that at most
    ``max_samples`` samples are used; returns (sums, samples used)."""
    frozen, loss_at = _functional(model, loss_fn)
    sums: Scores = {}
    used = 0
    with _scoring(model):
        for x, y in _pairs(batches, _device(model)):
            if max_samples is not None:
                x, y = x[: max_samples - used], y[: max_samples - used]
            for n, s in per_batch(frozen, loss_at, x, y).items():
                sums[n] = sums[n] + s if n in sums else s
            used += len(x)
            if max_samples is not None and used >= max_samples:
                break
    require(used > 0, "batches gave no sample: pass at least one non-empty (inputs, targets) batch")
    return {n: sums[n] for n in names}, used


def fisher(model: nn.Module, batches: Iterable, loss_fn: LossFn, *, names: Iterable[str] | None = None,
           max_samples: int | None = None) -> Scores:
    """The diagonal of the empirical Fisher, F_ii = (1/N) sum_n (d l_n / d w_i)^2, l_n the loss of
    sample n alone, over the N samples actually used (at most ``max_samples``; the last batch is cut).

    Per-sample gradients come from ``torch.func.vmap(torch.func.grad(loss of one sample))`` over each
    batch (memory: batch size x parameters). The model runs in eval mode, so BatchNorm uses its running
    statistics and each sample's loss does not depend on the others (train-mode BatchNorm couples
    the samples of a batch and cannot run under vmap).

    Kunstner, Balles, Hennig, "Limitations of the Empirical Fisher Approximation for Natural Gradient
    Descent", arXiv:1905.12558, define it (with the observed labels; the "true" Fisher samples labels
    from the model) and show where it and the Fisher part ways. The score is F_ii itself, as in the
    source; taking F for the Hessian in OBD's saliency gives 0.5 * F_ii * w_i^2 (Theis et al., "Faster
    gaze prediction with dense networks and Fisher pruning", arXiv:1801.05787), one line from this.
    Compare :func:`fisher_batch_mean`, the source's version. Returns: name -> F_ii shaped like the weight.
    """
    _check_data(batches, loss_fn, "fisher")
    _limit(max_samples)
    weights = _weights(model, names)

    def per_batch(frozen: Mapping, loss_at: Callable, x: torch.Tensor, y: Any) -> Scores:
        def sample_loss(params: Mapping, xi: torch.Tensor, yi: Any) -> torch.Tensor:  # one sample, batch dim dropped
            return loss_at(params, xi.unsqueeze(0), yi.unsqueeze(0))

        per_sample_grads = func.vmap(func.grad(sample_loss), in_dims=(None, 0, 0))
        G = per_sample_grads({n: frozen[n] for n in weights}, x, y)  # name -> (B, *w.shape)
        return {n: g.square().sum(0) for n, g in G.items()}

    with _math_attention():
        sums, used = _per_sample_sums(model, batches, loss_fn, weights, max_samples, per_batch)
    return {n: s / used for n, s in sums.items()}


def fisher_batch_mean(model: nn.Module, batches: Iterable, loss_fn: LossFn, *, names: Iterable[str] | None = None,
                      max_samples: int | None = None) -> Scores:
    """The source's "Fisher" (kept for teaching; do not prune with it): sum_b (dL_b/dw)^2 / N, the
    *batch-mean* gradient squared, summed over batches and divided by the number of samples N.

    For B independent samples per batch, E[(mean_n g_n)^2] = (E g)^2 + Var(g) / B, whereas the Fisher
    is E[g^2] = (E g)^2 + Var(g): the squared batch mean shrinks the per-sample spread by B (and the
    source divides by samples, not batches: another 1/B) and weighs it differently against the mean
    gradient per weight, so rankings differ. With B = 1 it equals :func:`fisher`.
    """
    _check_data(batches, loss_fn, "fisher_batch_mean")
    _limit(max_samples)
    weights = _weights(model, names)

    def per_batch(frozen: Mapping, loss_at: Callable, x: torch.Tensor, y: Any) -> Scores:
        with torch.enable_grad():
            leaves = _leaves(frozen, weights)
            grads = torch.autograd.grad(loss_at(leaves, x, y), list(leaves.values()), materialize_grads=True)
        return {n: g.square() for n, g in zip(leaves, grads)}

    sums, used = _per_sample_sums(model, batches, loss_fn, weights, max_samples, per_batch)
    return {n: s / used for n, s in sums.items()}


# ----------------------------------------------------------------------------- 4. SNIP
def snip(model: nn.Module, batches: Iterable, loss_fn: LossFn, *, names: Iterable[str] | None = None) -> Scores:
    """SNIP's connection sensitivity (Lee, Ajanthan, Torr, "SNIP: Single-shot Network Pruning based
    on Connection Sensitivity", arXiv:1810.02340): with a mask c on the weights, dL/dc_j = g_j w_j, and

        s_j = |g_j w_j| / sum_k |g_k w_k|   over all scored weights, from ONE batch

    (only the first batch of ``batches`` is read). Meant for a freshly initialised model, pruned once
    before training (the paper initialises with variance scaling). The scores sum to 1.
    """
    _check_data(batches, loss_fn, "snip")
    weights = _weights(model, names)
    with _scoring(model):
        grads = next(_batch_grads(model, batches, loss_fn, weights), None)
    require(grads is not None, "batches is empty: SNIP needs one (inputs, targets) batch")
    saliency = {n: (g * weights[n].detach()).abs() for n, g in grads.items()}
    total = sum(float(s.double().sum()) for s in saliency.values())
    require(total > 0, "every |g*w| is 0 on this batch (no gradient reaches the weights): SNIP is undefined")
    return {n: s / total for n, s in saliency.items()}


# ----------------------------------------------------------------------------- 5. activations (structured)
def _next_relu(modules: Sequence[nn.Module], owner: nn.Module) -> nn.Module | None:
    """The first nn.ReLU after ``owner`` in registration order, if it comes before the next Linear/Conv."""
    for m in modules[modules.index(owner) + 1:]:
        if isinstance(m, nn.ReLU):
            return m
        if isinstance(m, prune.PRUNABLE):
            return None
    return None


def _sites(model: nn.Module, names: Iterable[str] | None,
           site: str | Mapping[str, str]) -> dict[str, tuple[nn.Module, nn.Module]]:
    """name -> (the weight's Linear/Conv module, the module whose output is read)."""
    require(site in SITES or isinstance(site, Mapping),
            f"site must be one of {SITES} or a dict weight name -> module name, got {site!r}")
    if isinstance(site, Mapping) and names is None:
        names = list(site)  # a dict of sites says which weights to score
    weights, modules, order = _weights(model, names), dict(model.named_modules()), list(model.modules())
    out = {}
    for n in weights:
        owner = modules.get(n.rpartition(".")[0])
        require(isinstance(owner, prune.PRUNABLE) and n.endswith(".weight"),
                f"{n!r} is not the weight of a Linear/Conv1d/Conv2d: activation criteria score its output channels")
        if isinstance(site, Mapping):
            target = modules.get(site[n]) if n in site and site[n] else None
            require(isinstance(target, nn.Module),
                    f"site[{n!r}] must name a submodule of the model, got {site.get(n)!r}")
        else:
            target = owner if site == "output" else _next_relu(order, owner)
        if target is None and names is None:
            continue  # default names: a layer with no ReLU after it (the logits) is left out
        require(target is not None, f"{n!r} has no nn.ReLU after it (before the next Linear/Conv): pass site as a "
                                    f"dict weight name -> module name, or leave {n!r} out")
        out[n] = (owner, target)
    require(bool(out), "no weight to score: no Linear/Conv is followed by an nn.ReLU module")
    return out


def _channel_means(model: nn.Module, batches: Iterable, sites: Mapping[str, tuple[nn.Module, nn.Module]],
                   stat: Callable[[torch.Tensor], torch.Tensor]) -> Scores:
    """Per output channel of each weight: the mean of ``stat(activation)`` over samples and positions."""
    sums: Scores = {}
    counts = dict.fromkeys(sites, 0)

    def hook(name: str, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        owner = sites[name][0]
        a = out.detach().movedim(-1 if isinstance(owner, nn.Linear) else 1, -1)  # channels last
        a = a.reshape(-1, a.shape[-1])  # (B * positions, C)
        require(a.shape[1] == owner.weight.shape[0], f"the output read for {name!r} has {a.shape[1]} channels, "
                                                     f"the weight {owner.weight.shape[0]}: choose another site")
        sums[name] = sums.get(name, 0) + stat(a).sum(0, dtype=torch.float64)  # (C,)
        counts[name] += a.shape[0]

    handles = []
    try:
        with _scoring(model), torch.no_grad():
            handles = [target.register_forward_hook(functools.partial(hook, n)) for n, (_, target) in sites.items()]
            for x, _ in _pairs(batches, _device(model), targets=False):
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    require(all(counts.values()), "batches gave no sample, or a site was never called: pass non-empty batches")
    return {n: (sums[n] / counts[n]).to(owner.weight.dtype) for n, (owner, _) in sites.items()}


def activation(model: nn.Module, batches: Iterable, loss_fn: LossFn | None = None, *,
               names: Iterable[str] | None = None,
               site: str | Mapping[str, str] = "output") -> Scores:
    """Mean |activation| per output channel (conv: over samples and positions) or neuron (linear),
    read by forward hooks: the source's activation criterion, structured by nature (compared with
    Taylor criteria by Molchanov et al., arXiv:1611.06440). Batches may be bare input tensors.

    ``site="output"`` reads the Conv/Linear output itself (the source's choice; behind a BatchNorm
    its scale is normalised away, so it says little there); ``"relu"`` reads the first nn.ReLU module
    after the layer (registration order, which is execution order in nn.Sequential; layers with none,
    like the logits, are left out); or a dict weight name -> module name (scores those weights). A site
    module must run once per forward pass (not a ReLU instance shared by several layers).
    Returns: name -> (C_out,) scores.
    """
    _check_data(batches, loss_fn, "activation", needs_loss=False)
    return _channel_means(model, batches, _sites(model, names, site), torch.abs)


def apoz(model: nn.Module, batches: Iterable, loss_fn: LossFn | None = None, *, names: Iterable[str] | None = None,
         site: str | Mapping[str, str] = "relu") -> Scores:
    """1 - APoZ per output channel, APoZ the Average Percentage of Zeros of its ReLU output over samples
    and positions (Hu, Peng, Tai, Tang, "Network Trimming", arXiv:1607.03250, eq. 1). The paper prunes
    high APoZ; the score here is the fraction of non-zeros so that, like every score here, low = prune.

    ``site``: as for :func:`activation`, default the first nn.ReLU after each layer (layers without
    one are left out). Returns: name -> (C_out,) scores in [0, 1].
    """
    _check_data(batches, loss_fn, "apoz", needs_loss=False)
    return _channel_means(model, batches, _sites(model, names, site), lambda a: (a != 0).double())


# ----------------------------------------------------------------------------- 6. second order
def hutchinson_diagonal(model: nn.Module, batches: Iterable, loss_fn: LossFn, *, names: Iterable[str] | None = None,
                        probes: int = 100, seed: int = 0) -> Scores:
    """The Hessian diagonal by Hutchinson's estimator, diag(H) = E[z * Hz] for Rademacher z (+-1 each
    with probability 1/2), averaged over ``probes`` probes per batch and over batches; H of each
    batch's mean loss w.r.t. all scored weights jointly. Hz is a Hessian-vector product by double
    backprop (Pearlmutter 1994): grad of (grad L . z), never forming H.

    Hutchinson (1989) estimates traces; the diagonal form is Bekas, Kokiopoulou, Saad, "An estimator
    for the diagonal of a matrix" (2007); PyHessian (Yao et al., arXiv:1912.07145) uses it on networks.
    One probe's error on h_ii is sum_{j != i} H_ij z_i z_j, variance sum_{j != i} H_ij^2: the error
    falls like 1/sqrt(probes), and is zero for a diagonal H.
    Returns: name -> h_ii shaped like the weight (signed; a noisy or non-convex estimate can be < 0).
    """
    _check_data(batches, loss_fn, "hutchinson")
    _check_int(probes, "probes", 1, "Rademacher probes per batch")
    _check_int(seed, "seed", 0, "the probes' seed")
    weights = _weights(model, names)
    frozen, loss_at = _functional(model, loss_fn)
    g = torch.Generator().manual_seed(seed)

    def per_batch(x: torch.Tensor, y: Any) -> Scores:
        leaves = _leaves(frozen, weights)
        w = list(leaves.values())
        grads = torch.autograd.grad(loss_at(leaves, x, y), w, create_graph=True)
        est = [torch.zeros_like(t) for t in w]
        for _ in range(probes):
            z = [(torch.randint(0, 2, t.shape, generator=g) * 2 - 1).to(t) for t in w]  # Rademacher, like each weight
            Hz = torch.autograd.grad(grads, w, grad_outputs=z, retain_graph=True, materialize_grads=True)  # H z
            est = [e + zi * hzi for e, zi, hzi in zip(est, z, Hz)]
        return {n: e.detach() / probes for n, e in zip(leaves, est)}

    with _scoring(model), torch.enable_grad(), _math_attention():
        return _average(per_batch(x, y) for x, y in _pairs(batches, _device(model)))


def hessian_diagonal_exact(model: nn.Module, batches: Iterable, loss_fn: LossFn, *, names: Iterable[str] | None = None,
                           max_numel: int = 4096) -> Scores:
    """The exact Hessian diagonal, mean over batches, from each weight's full Hessian block
    (``torch.autograd.functional.hessian``: numel backward passes, numel^2 memory), for tiny models
    and for checking :func:`hutchinson_diagonal`. Weights over ``max_numel`` elements are refused.
    Returns: name -> h_ii shaped like the weight."""
    _check_data(batches, loss_fn, "hessian_exact")
    _check_int(max_numel, "max_numel", 1, "the largest weight whose full Hessian block is formed")
    weights = _weights(model, names)
    big = {n: w.numel() for n, w in weights.items() if w.numel() > max_numel}
    require(not big, f"weights {big} have over max_numel={max_numel} elements: the exact Hessian is for tiny "
                     "models; pass names=[a small layer], raise max_numel, or use hutchinson_diagonal")
    frozen, loss_at = _functional(model, loss_fn)

    def per_batch(x: torch.Tensor, y: Any) -> Scores:
        out = {}
        for n, w in weights.items():
            H = torch.autograd.functional.hessian(lambda v, n=n: loss_at({n: v}, x, y), frozen[n])  # (*shape, *shape)
            out[n] = H.reshape(w.numel(), w.numel()).diagonal().reshape(w.shape)
        return out

    with _scoring(model), torch.enable_grad(), _math_attention():
        return _average(per_batch(x, y) for x, y in _pairs(batches, _device(model)))


def hessian_row_sums(model: nn.Module, batches: Iterable, loss_fn: LossFn, *,
                     names: Iterable[str] | None = None) -> Scores:
    """The source's "Hessian diagonal" (kept for teaching; it is not the diagonal): d(sum_j g_j)/dw_i
    = sum_j H_ij, i.e. ``autograd.grad(g.sum(), w)`` = H_ww @ 1, the row sums of the weight's own
    Hessian block, mean over batches (the source then takes |.|). Equal to the diagonal only when the
    block is diagonal. Returns: name -> row sums shaped like the weight (signed)."""
    _check_data(batches, loss_fn, "hessian_row_sums")
    weights = _weights(model, names)
    frozen, loss_at = _functional(model, loss_fn)

    def per_batch(x: torch.Tensor, y: Any) -> Scores:
        leaves = _leaves(frozen, weights)
        grads = torch.autograd.grad(loss_at(leaves, x, y), list(leaves.values()), create_graph=True)
        return {n: torch.autograd.grad(g.sum(), leaves[n], retain_graph=True, materialize_grads=True)[0].detach()
                for n, g in zip(leaves, grads)}  # H_ww @ 1 per weight

    with _scoring(model), torch.enable_grad(), _math_attention():
        return _average(per_batch(x, y) for x, y in _pairs(batches, _device(model)))


def obd(model: nn.Module, batches: Iterable, loss_fn: LossFn, *, names: Iterable[str] | None = None,
        hessian: str = "hutchinson", probes: int = 100, seed: int = 0, max_numel: int = 4096) -> Scores:
    """Optimal Brain Damage's saliency s_i = h_ii w_i^2 / 2 (LeCun, Denker, Solla, "Optimal Brain
    Damage", NeurIPS 1989): at a minimum (gradient ~0) with a diagonal Hessian, setting w_i to 0 raises
    the loss by about this much. h_ii from :func:`hutchinson_diagonal` (``hessian="hutchinson"``,
    ``probes``, ``seed``) or :func:`hessian_diagonal_exact` (``"exact"``, ``max_numel``).
    Returns: name -> saliency shaped like the weight (negative where the estimated h_ii is)."""
    require(hessian in HESSIANS, f"hessian must be one of {HESSIANS}, got {hessian!r}")
    if hessian == "hutchinson":
        h = hutchinson_diagonal(model, batches, loss_fn, names=names, probes=probes, seed=seed)
    else:
        h = hessian_diagonal_exact(model, batches, loss_fn, names=names, max_numel=max_numel)
    weights = _weights(model, names)
    return {n: 0.5 * h[n] * weights[n].detach().square() for n in h}


# ----------------------------------------------------------------------------- 7. combined; structured reductions
def _minmax(s: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    return (s - low) / (high - low) if high > low else torch.ones_like(s)  # the source's rule for a constant


def combined(score_dicts: Mapping[str, Mapping[str, torch.Tensor]], weights: Mapping[str, float],
             scope: str = "layer") -> Scores:
    """The source's combined evaluator: sum_c weights[c] * minmax(scores_c) / sum_c weights[c].

    ``scope="layer"`` (the source's) min-max normalises each criterion's tensor by its own min and max,
    so every layer spans [0, 1] and one global threshold then prunes layers about equally;
    ``"global"`` uses one min and max per criterion over all its tensors, keeping the scale between
    layers. The two give different global rankings. A constant tensor (or criterion) normalises to 1.

    Args: score_dicts: criterion -> {name: scores}, all with the same names and shapes; weights:
        criterion -> weight >= 0 (the same criteria), summing to more than 0.
    Returns: name -> combined scores in [0, 1].
    """
    require(isinstance(score_dicts, Mapping) and len(score_dicts) > 0,
            "score_dicts must be a non-empty dict criterion -> {name: scores}")
    require(isinstance(weights, Mapping) and set(weights) == set(score_dicts),
            f"weights must give one weight per criterion of score_dicts {list(score_dicts)}, got {weights!r}")
    require(all(is_number(v) and math.isfinite(v) and v >= 0 for v in weights.values()),
            f"weights must be finite numbers >= 0, got {dict(weights)}")
    total = sum(weights.values())
    require(total > 0, f"weights must sum to a positive number, got {dict(weights)} (sum {total})")
    require(scope in SCOPES, f"scope must be one of {SCOPES}, got {scope!r}")
    first = next(iter(score_dicts.values()))
    for c, scores in score_dicts.items():
        require(isinstance(scores, Mapping) and set(scores) == set(first)
                and all(isinstance(scores[n], torch.Tensor) and scores[n].shape == first[n].shape for n in first),
                f"score_dicts[{c!r}] must have the same names and shapes as the first criterion's")
        require(all(bool(torch.isfinite(s).all()) for s in scores.values()), f"score_dicts[{c!r}] holds NaN or inf")
    out = {n: 0 for n in first}
    for c, scores in score_dicts.items():
        flat = torch.cat([s.detach().reshape(-1) for s in scores.values()])
        for n, s in scores.items():
            low, high = (s.min(), s.max()) if scope == "layer" else (flat.min(), flat.max())
            out[n] = out[n] + weights[c] / total * _minmax(s.detach(), low, high)
    return out


def _check_groups(scores: Mapping[str, torch.Tensor], group_size: int) -> None:
    for n, s in scores.items():
        require(isinstance(s, torch.Tensor) and s.dim() >= 2 and s.shape[0] % group_size == 0,
                f"scores[{n!r}] has shape {tuple(getattr(s, 'shape', ()))}: reduce needs element scores "
                f"(out, in, ...) with out divisible by group_size={group_size}")


def reduce(scores: Mapping[str, torch.Tensor], how: str = "l2", *, group_size: int = 1) -> Scores:
    """Element scores -> one score per output channel (row of a Linear, filter of a Conv), or per
    ``group_size`` consecutive channels (a head), reducing over everything else (inputs, kernel taps):

    - ``"l1"``: sum |s| (of |w|: Li et al.'s filter L1 norm, arXiv:1608.08710);
    - ``"l2"``: sqrt(sum s^2) (of w: the filter L2 norm, ``torch.nn.utils.prune.ln_structured``);
    - ``"sum"``: sum s (of |g*w|, Fisher or OBD scores: the group's total);
    - ``"taylor_group"``: (sum s)^2 for signed s = g*w of one batch: Molchanov et al.'s group Taylor
      (arXiv:1906.10771); over several batches use ``taylor(.., form="group")``.

    Example: s = [[1, -2], [3, 0]] gives l1 [3, 3], l2 [2.24, 3], sum [-1, 3], taylor_group [1, 9].
    Returns: name -> (C_out / group_size,) scores.
    """
    require(how in REDUCTIONS, f"how must be one of {REDUCTIONS}, got {how!r}")
    _check_int(group_size, "group_size", 1, "output channels per group, 1 = each channel")
    require(isinstance(scores, Mapping) and len(scores) > 0, "scores must be a non-empty dict name -> scores")
    _check_groups(scores, group_size)
    out = {}
    for n, s in scores.items():
        rows = s.detach().reshape(s.shape[0] // group_size, -1)  # (C_out / group_size, group_size * in * kh * kw)
        if how == "l1":
            out[n] = rows.abs().sum(1)
        elif how == "l2":
            out[n] = torch.linalg.vector_norm(rows, dim=1)
        else:
            out[n] = rows.sum(1) if how == "sum" else rows.sum(1).square()
    return out


def expand(channel_scores: Mapping[str, torch.Tensor], model: nn.Module) -> Scores:
    """Per-channel scores (``activation``, ``apoz``, :func:`reduce`) as element scores: each weight
    gets its output channel's score, shaped like the weight. Ranking these globally prunes whole
    channels (ties inside a channel are broken by position), which is what a structured criterion
    means when an unstructured budget is asked of it."""
    require(isinstance(channel_scores, Mapping) and len(channel_scores) > 0,
            "channel_scores must be a non-empty dict name -> (C_out,) scores")
    weights = _weights(model, list(channel_scores))
    for n, s in channel_scores.items():
        require(isinstance(s, torch.Tensor) and s.dim() == 1 and s.numel() == weights[n].shape[0],
                f"channel_scores[{n!r}] must have shape ({weights[n].shape[0]},), got {tuple(getattr(s, 'shape', ()))}")
    return {n: prune.broadcast_channels(s.detach(), weights[n]) for n, s in channel_scores.items()}


def relative_error(estimate: Mapping[str, torch.Tensor], exact: Mapping[str, torch.Tensor]) -> float:
    """||estimate - exact||_2 / ||exact||_2 over all tensors together (the same names and shapes)."""
    require(isinstance(estimate, Mapping) and isinstance(exact, Mapping) and set(estimate) == set(exact) and exact,
            "estimate and exact must be non-empty dicts with the same names")
    num = sum(float((estimate[n].double() - exact[n].double()).square().sum()) for n in exact)
    den = sum(float(exact[n].double().square().sum()) for n in exact)
    require(den > 0, "exact is all zeros: the relative error is undefined")
    return math.sqrt(num / den)


def causal_lm_loss(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM, as ``loss_fn`` for this module's criteria:
    ``outputs`` a model output with ``.logits`` (B, T, V) (or the logits), ``targets`` (B, T) the next
    tokens (``data.lm_windows`` yields (inputs, targets) pairs already shifted)."""
    logits = getattr(outputs, "logits", outputs)
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2).float(), targets.reshape(-1))


# ----------------------------------------------------------------------------- the entry point
_FUNCTIONS: Mapping[str, tuple[Callable, dict, tuple[str, ...]]] = MappingProxyType({
    "l1": (magnitude, {"p": 1}, ()), "l2": (magnitude, {"p": 2}, ()),
    "gradient": (gradient, {}, ()), "taylor": (taylor, {}, ("form",)),
    "fisher": (fisher, {}, ("max_samples",)), "fisher_batch_mean": (fisher_batch_mean, {}, ("max_samples",)),
    "snip": (snip, {}, ()), "activation": (activation, {}, ("site",)), "apoz": (apoz, {}, ("site",)),
    "hutchinson": (hutchinson_diagonal, {}, ("probes", "seed")),
    "hessian_exact": (hessian_diagonal_exact, {}, ("max_numel",)),
    "hessian_row_sums": (hessian_row_sums, {}, ()), "obd": (obd, {}, ("hessian", "probes", "seed", "max_numel")),
    "random": (random, {}, ("seed",)),
})


def score(criterion: str, model: nn.Module, batches: Iterable | None = None, loss_fn: LossFn | None = None, *,
          names: Iterable[str] | None = None, reduction: str | None = None, group_size: int = 1,
          **options: Any) -> Scores:
    """Score ``model``'s weights by ``criterion`` (one of :data:`CRITERIA`), the contract of the module.

    Args:
        criterion: "l1", "l2", "gradient", "taylor", "fisher", "fisher_batch_mean", "snip",
            "activation", "apoz", "hutchinson", "hessian_exact", "hessian_row_sums", "obd",
            "combined" or "random".
        batches, loss_fn, names: as in the module's contract.
        reduction: None (element scores), "l1" / "l2" / "sum" (:func:`reduce` of the element scores),
            or "taylor_group" (criterion "taylor" only: Molchanov's per-batch group form). Not for
            "activation" / "apoz", already per channel. ``group_size``: channels per group (a head).
        options: the criterion's own (probes, seed, max_samples, form, site, hessian, max_numel);
            "combined" takes ``weights`` (criterion -> weight, default :data:`SOURCE_WEIGHTS`) and
            ``scope``, and scores each of its criteria with their defaults.
    Returns: name -> scores (shaped like the weight, or (C_out / group_size,) when structured).
    """
    require(criterion in CRITERIA, f"unknown criterion {criterion!r}; accepted: {', '.join(CRITERIA)}")
    require(reduction is None or reduction in REDUCTIONS,
            f"reduction must be None or one of {REDUCTIONS}, got {reduction!r}")
    require(reduction != "taylor_group" or criterion == "taylor",
            f"reduction 'taylor_group' is the group form of 'taylor' only; for {criterion!r} use 'l1', 'l2' or 'sum'")
    require(reduction is None or criterion not in STRUCTURED,
            f"{criterion!r} scores are already one per channel: use reduction=None")
    _check_int(group_size, "group_size", 1, "output channels per group, 1 = each channel")
    accepted = ("weights", "scope") if criterion == "combined" else _FUNCTIONS[criterion][2]
    unknown = sorted(set(options) - set(accepted))
    require(not unknown, f"unknown options {unknown} for criterion {criterion!r}; accepted: {list(accepted)}")
    if criterion == "combined":
        raw = _score_combined(model, batches, loss_fn, names, **options)
    else:
        fn, fixed, _ = _FUNCTIONS[criterion]
        if criterion not in DATA_FREE:
            _check_data(batches, loss_fn, criterion, needs_loss=criterion not in STRUCTURED)
        if criterion == "taylor":
            require(reduction != "taylor_group" or options.get("form", "group") == "group",
                    f"reduction 'taylor_group' computes form 'group'; got form={options.get('form')!r}")
            options = {**options, "group_size": group_size}
            if reduction == "taylor_group":
                options["form"] = "group"
        raw = fn(model, batches, loss_fn, names=names, **fixed, **options)
    return raw if reduction in (None, "taylor_group") else reduce(raw, reduction, group_size=group_size)


def _score_combined(model: nn.Module, batches: Iterable | None, loss_fn: LossFn | None, names: Iterable[str] | None,
                    weights: Mapping[str, float] = SOURCE_WEIGHTS, scope: str = "layer") -> Scores:
    require(isinstance(weights, Mapping) and len(weights) > 0 and all(c in _FUNCTIONS for c in weights),
            f"weights must be a dict criterion -> weight, criteria from {list(_FUNCTIONS)}, got {weights!r}")
    require(all(c not in STRUCTURED for c in weights) or all(c in STRUCTURED for c in weights),
            f"weights mixes per-weight and per-channel criteria {list(weights)}: combine one kind")
    require(scope in SCOPES, f"scope must be one of {SCOPES}, got {scope!r}")
    require(all(is_number(v) and math.isfinite(v) and v >= 0 for v in weights.values()) and sum(weights.values()) > 0,
            f"weights must be finite numbers >= 0 summing to a positive number, got {dict(weights)}")
    for c in weights:
        if c not in DATA_FREE:
            _check_data(batches, loss_fn, c, needs_loss=c not in STRUCTURED)
    batches = None if batches is None else list(batches)  # read by every criterion
    names = None if names is None else list(names)
    return combined({c: score(c, model, batches, loss_fn, names=names) for c in weights}, weights, scope)
