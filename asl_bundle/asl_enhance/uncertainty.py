"""Per-voxel standard deviation (SD) of the enhanced deltaM: the network's response to resampled noise.

The noise twin (:func:`transforms.noise_twin`) is a perfusion-free combination of the input pairs with
the k-pair mean's noise statistics (level, spatial correlation) but an independent realisation. The
network's response to it, ``(f(mean + eps * twin) - f(mean)) / eps`` (a finite-difference
Jacobian-vector product: one extra network pass), is how one draw of input noise moves the enhanced
map; its local root mean square in a Gaussian window (the window the noise bound measures the input
noise in, :meth:`networks.ScaleMixingEnhancer.local_noise_sd`) estimates the output's noise SD. More
draws come from the other zero-sum contrasts of the pairs where k >= 3 (:func:`noise_contrasts`; one
pass each). The enhanced map's error also has a bias part (smoothing) that no noise draw shows and
that varies less across the head than the noise response does, so the calibrated map is
``sqrt(a^2 * raw^2 + b^2 * head^2)`` inside the head mask (``a * raw`` outside, where there is no
perfusion to smooth), where ``head`` is the raw map's RMS over the head mask, with
(a, b) per k fitted by maximum likelihood on the simulated validation split against the noise-free
truth and on real long scans against their unused pairs (that reference's own noise variance added),
each half the weight (:data:`CALIBRATION`). ``studies/uncertainty`` holds the measurements that chose the
estimator, the step and this form.

A single pair (k = 1) has no twin, so its noise cannot be measured, only assumed: the draw is then the
pair's own high-pass (the pair minus its Gaussian blur, :data:`HIGHPASS` voxels), which has about the
noise's level and fine texture but also holds edges and perfusion texture, and the map gets its own
(a, b) (:data:`SINGLE_PAIR_ASSUMPTIONS` say what is assumed; ``single_pair`` false writes none and says
why, :data:`SINGLE_PAIR_REASON`).

Maps are computed in the network's normalised units; the handler multiplies them by the item's
``scale`` (homogeneous: scaling the series by c scales the SD map by c; a noise-free input of k >= 2
pairs has a zero twin and a zero map, a single noise-free pair does not).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine

from .layout import InputLayout
from .networks import NOISE_WINDOW, GaussianSmooth
from .transforms import noise_twin

#: Gaussian window (voxels: in-plane, in-plane, through-plane sigma) of the local RMS, as the noise bound's
WINDOW = NOISE_WINDOW
#: finite-difference step along a noise draw, in units of the draw (small: the local linear response)
EPSILON = 0.1
#: per k, (a, b) of the calibrated map sqrt(a^2 raw^2 + b^2 head^2) (see the module doc) so that it
#: covers the error, bias included: fitted on the simulated validation split (against the truth) and
#: on real long scans (against their unused pairs) with one draw (asl-calibration --fit --fit_real;
#: a real scan left out of the fit is covered about as well, studies/uncertainty); a k not listed takes
#: the entry of the largest k below it (the smallest k listed when none is below); a single number is (a, 0)
CALIBRATION: dict[int, tuple[float, float]] = {
    1: (8.72, 6.045),
    2: (0.99, 0.572),
    3: (1.018, 0.859),
    4: (1.274, 1.001),
    6: (1.35, 0.396),
}
#: Gaussian sigma (voxels) of the blur a single pair's high-pass draw subtracts (studies/single_pair_noise:
#: its RMS is 0.95-1.36x the pair's noise on real scans)
HIGHPASS: tuple[float, float, float] = (1.0, 1.0, 0.5)
SINGLE_PAIR_REASON = (
    "no SD map for a single pair (uncertainty#single_pair is off): without a second pair there is no noise twin, "
    "so the network's response to noise cannot be measured; the single-pair map (on in inference.json) assumes the "
    "pair's high-pass stands for its noise"
)
METHOD_TEXT = (
    "Local RMS (Gaussian window, sigma {window} voxels) of the network's response to the noise twin of the "
    "input pairs (an independent draw with the k-pair mean's noise statistics; {draws} draw(s)), by a finite "
    "difference (f(mean + {eps} * twin) - f(mean)) / {eps}; calibrated as sqrt(a^2 raw^2 + b^2 head^2) inside "
    "the head mask (a * raw outside it) with head the raw map's RMS over the head mask and (a, b) = ({a}, {b}) "
    "for k = {k}, fitted on simulated validation subjects against the noise-free truth and on real long scans "
    "against their unused pairs, so that the map covers the total error (the smoothing bias as well as the noise)."
)
SINGLE_PAIR_METHOD_TEXT = (
    "One pair: no second pair, so no noise twin. The draw is the pair's own high-pass (the pair minus its "
    "Gaussian blur, sigma {highpass} voxels); the map is the local RMS (Gaussian window, sigma {window} voxels) of "
    "the network's response to it, (f(pair + {eps} * highpass) - f(pair)) / {eps}, calibrated as "
    "sqrt(a^2 raw^2 + b^2 head^2) inside the head mask with (a, b) = ({a}, {b}) for k = 1, fitted on simulated "
    "validation subjects against the truth and on real long scans against their unused pairs."
)
SINGLE_PAIR_ASSUMPTIONS = [
    "ASSUMED, not measured: the pair's high-pass has the pair's noise level and texture at fine scales (its RMS "
    "is 0.95-1.36x the noise on real scans); coarse-scale noise and whole-brain fluctuations are not seen",
    "the high-pass also holds edges and perfusion texture: a noise-free pair still gets a map there, so read it "
    "as an estimate of where the enhanced map may be wrong (edges, lesion borders), not as a noise measurement",
    "the noise is locally stationary over the window; the network responds to the draw about linearly",
    "acquire 2 or more pairs for a map made from the data's own noise",
]
ASSUMPTIONS = [
    "the input pairs are independent repeats with equal noise statistics (the twin then has the mean's noise)",
    "the noise is locally stationary over the window (the map is smooth at that scale)",
    "the network responds to a noise draw about linearly (the finite difference is its Jacobian along the draw)",
    "the bias part of the error scales like that of the simulated and real scans of the fit (one (a, b) per k); it is "
    "larger in grey than in white matter, which the map does not know (grey matter is under-covered)",
    "one draw (k = 2) sees one sample of any whole-brain fluctuation (pair level changes): its share of the map "
    "is uncertain by a factor of about 2 per scan",
]


def noise_contrasts(k: int) -> np.ndarray:
    """(k - 1, k) weights of zero-sum pair combinations, mutually orthogonal, each with squared sum 1/k.

    Row 0 is :func:`noise_twin`'s; every row, applied to k independent pairs of equal noise, is an
    independent draw with the k-pair mean's noise statistics and no perfusion. Empty for k < 2.
    """
    if k < 2:
        return np.zeros((0, k))
    first = noise_twin(np.eye(k)[:, :, None, None]).astype(np.float64).ravel()
    basis = np.column_stack([np.ones(k) / np.sqrt(k), first / np.linalg.norm(first), np.eye(k)])
    q, _ = np.linalg.qr(basis)
    rows = [first] + [q[:, j] / np.sqrt(k) for j in range(2, k)]
    signs = [1.0] + [np.sign(r[np.argmax(np.abs(r))]) for r in rows[1:]]
    return np.stack([s * r for s, r in zip(signs, rows)])


def noise_draws(pairs: np.ndarray, count: int | None = None) -> np.ndarray:
    """Up to ``count`` (all k - 1 when None) independent noise draws (D, X, Y, Z) of the mean of ``pairs``."""
    pairs = np.asarray(pairs, np.float64)
    weights = noise_contrasts(pairs.shape[0])
    weights = weights if count is None else weights[: max(0, int(count))]
    return np.tensordot(weights, pairs, axes=1).astype(np.float32)


def response(
    network: torch.nn.Module,
    image: torch.Tensor,
    draw: torch.Tensor,
    pred: torch.Tensor | None = None,
    epsilon: float = EPSILON,
    num_pairs: torch.Tensor | None = None,
) -> torch.Tensor:
    """The network's change per unit of ``draw`` (B, 1, ...) added to the k-pair mean channel of ``image``
    (B, C, ...), one-sided from ``pred`` (the unperturbed output; computed when None); ``num_pairs`` (B,) as
    the network was given it (its risk-chosen blend depends on k)."""
    plus = image.clone()
    plus[:, :1] += epsilon * draw
    base = network(image, num_pairs) if pred is None else pred
    return (network(plus, num_pairs) - base) / epsilon


def local_rms(energy: torch.Tensor, window: Sequence[float] = WINDOW) -> torch.Tensor:
    """sqrt of the Gaussian-window mean of ``energy`` (B, 1, X, Y, Z)."""
    smooth = GaussianSmooth(energy.dim() - 2, list(window)[: energy.dim() - 2]).to(energy.device)
    return torch.sqrt(smooth(energy).clamp_min(0.0))


@torch.no_grad()
def enhanced_sd(
    network: torch.nn.Module,
    image: torch.Tensor,
    draws: torch.Tensor,
    pred: torch.Tensor | None = None,
    epsilon: float = EPSILON,
    window: Sequence[float] = WINDOW,
    num_pairs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raw (uncalibrated) SD map (B, 1, X, Y, Z) of the network's output, in the units of ``image``'s
    first channel: the energy of its responses to ``draws`` (B, D, X, Y, Z; noise draws of the k-pair
    mean in those units) averaged over draws, then over the ``window``, then the root. ``pred`` is the
    output on ``image`` (saves a pass); ``num_pairs`` (B,) as the network was given it."""
    energy = torch.zeros_like(image[:, :1])
    for j in range(draws.shape[1]):
        r = response(network, image, draws[:, j : j + 1], pred, epsilon, num_pairs)
        energy = energy + r * r
    return local_rms(energy / max(draws.shape[1], 1), window)


@contextmanager
def evaluating(network: torch.nn.Module) -> Iterator[None]:
    """The network in eval mode inside the block, back in its own mode after (per-scan adaptation may
    hand over a network in training mode)."""
    was_training = network.training
    network.eval()
    try:
        yield
    finally:
        network.train(was_training)


def _pair(value: Any) -> tuple[float, float]:
    values = [float(v) for v in (value if isinstance(value, Sequence) and not isinstance(value, str) else [value])]
    return (values[0], values[1] if len(values) > 1 else 0.0)


def calibration_factor(k: int, table: Mapping[Any, Any]) -> tuple[float, float]:
    """(a, b) for k from a {k: [a, b]} table (keys may be strings, as in JSON; a number is (a, 0))."""
    entries = sorted((int(key), _pair(value)) for key, value in table.items())
    if not entries:
        return (1.0, 0.0)
    below = [value for key, value in entries if key <= k]
    return below[-1] if below else entries[0][1]


def calibrate(raw: torch.Tensor, mask: torch.Tensor | None, a: float, b: float) -> torch.Tensor:
    """sqrt(a^2 raw^2 + b^2 head^2) for one raw map (1, X, Y, Z), head = its RMS inside ``mask``.

    The head term stands for the smoothing bias, which exists only where there is perfusion to smooth,
    so it is added inside ``mask`` only: outside the head the map is the noise response alone (a
    constant floor there drew a flat background). Without a usable mask it applies everywhere.
    """
    inside = mask is not None and bool((mask > 0.5).any())
    head = torch.sqrt(torch.mean((raw[mask > 0.5] if inside else raw).double() ** 2)).to(raw.dtype)
    bias = b * head * ((mask > 0.5).to(raw.dtype) if inside else torch.ones_like(raw))
    return torch.sqrt(a * a * raw * raw + bias * bias)


class EnhancedSDHandler:
    """Ignite handler: puts ``pred_sd`` (the calibrated SD of ``pred``, in the input's units) into every
    output item; for a single pair only with ``single_pair`` (its draw is the pair's high-pass: an
    assumption, see the module doc), else ``pred_sd_note`` says why there is none.

    Runs at MODEL_COMPLETED, after the engine's postprocessing and before any ITERATION_COMPLETED
    handler, so per-scan adaptation's networks are still in place and the writers see the map.
    ``draws``: noise draws per input (1: the twin; more use further pair contrasts where k allows, one
    network pass each; 0: no maps). ``calibration``: {k: [a, b]} (see :data:`CALIBRATION`; a single-pair
    map needs an entry for k = 1).
    """

    def __init__(
        self,
        layout: InputLayout | None = None,
        draws: int = 1,
        epsilon: float = EPSILON,
        window: Sequence[float] = WINDOW,
        calibration: Mapping[Any, Any] | None = None,
        output_key: str = "pred_sd",
        single_pair: bool = False,
        highpass: Sequence[float] = HIGHPASS,
    ):
        self.layout = layout or InputLayout()
        self.draws = int(draws)
        if self.layout.twin_channel is None and self.draws > 0:
            raise ValueError("the SD map needs the noise twin (layout.use_noise_twin); set draws 0 without it")
        self.epsilon = float(epsilon)
        self.window = tuple(float(w) for w in window)
        self.calibration = {int(k): _pair(v) for k, v in (CALIBRATION if calibration is None else calibration).items()}
        self.output_key = output_key
        if single_pair and 1 not in self.calibration:
            raise ValueError("single_pair maps need a calibration entry for k = 1 (asl-calibration --fit --ks 1)")
        self.single_pair = bool(single_pair)
        self.highpass = tuple(float(h) for h in highpass)

    def attach(self, engine: Engine) -> None:
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self)

    def settings(self) -> dict[str, Any]:
        """How the maps are made (for sidecars and study records)."""
        return {
            "draws": self.draws,
            "epsilon": self.epsilon,
            "window_sigma_voxels": list(self.window),
            "calibration": {str(k): list(v) for k, v in sorted(self.calibration.items())},
            "single_pair": self.single_pair,
            "single_pair_highpass_sigma_voxels": list(self.highpass),
        }

    def describe(self, k: int) -> dict[str, Any]:
        """The sidecar fields of a map made from k pairs."""
        draws = min(self.draws, k - 1)
        a, b = calibration_factor(k, self.calibration)
        if k < 2:
            text = SINGLE_PAIR_METHOD_TEXT.format(
                highpass=list(self.highpass), window=list(self.window), eps=self.epsilon, a=a, b=b
            )
            return {
                "UncertaintyMethod": text,
                "UncertaintyAssumptions": SINGLE_PAIR_ASSUMPTIONS,
                "UncertaintySettings": self.settings(),
            }
        text = METHOD_TEXT.format(window=list(self.window), draws=draws, eps=self.epsilon, a=a, b=b, k=k)
        return {
            "UncertaintyMethod": text,
            "UncertaintyAssumptions": ASSUMPTIONS,
            "UncertaintySettings": self.settings(),
        }

    def sd_map(
        self,
        network: torch.nn.Module,
        images: torch.Tensor,
        pred: torch.Tensor,
        pairs: Sequence[np.ndarray | None] | None = None,
        raw: bool = False,
        masks: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """SD maps (B, 1, ...) in normalised units for a batch (``images`` as the network saw them,
        ``pred`` its output); ``pairs``: each item's input pairs in normalised units (needed for more
        than one draw and for k; else k comes from the twin flag: 2); ``masks`` (B, 1, ...): head masks
        for the calibration's head term (None: whole volume). None when no item has a twin. Items
        without a twin get zeros. ``raw``: the uncalibrated response SD."""
        twin_channel = self.layout.twin_channel
        if self.draws <= 0 or twin_channel is None:
            return None
        present = [float(x[twin_channel + 1].max()) > 0.5 for x in images]
        single = [not ok and self.single_pair for ok in present]
        if not any(present) and not any(single):
            return None
        ks = [
            p.shape[0] if p is not None else (2 if ok else 1) for p, ok in zip(pairs or [None] * len(images), present)
        ]
        count = max(1, min([self.draws] + [k - 1 for k, ok in zip(ks, present) if ok]))
        if count == 1:
            draws = images[:, twin_channel : twin_channel + 1].clone()
        else:
            assert pairs is not None
            draws = torch.stack(
                [
                    torch.as_tensor(noise_draws(p, count))
                    if ok and p is not None
                    else torch.zeros((count, *images.shape[2:]))
                    for p, ok in zip(pairs, present)
                ]
            ).to(images.device, images.dtype)
        for i in (i for i, one in enumerate(single) if one):  # the pair's high-pass, as every draw
            draws[i] = self.highpass_draw(images[i : i + 1, :1])[0].expand_as(draws[i])
        num_pairs = torch.as_tensor(ks, device=images.device)
        sd = enhanced_sd(network, images, draws, pred, self.epsilon, window=self.window, num_pairs=num_pairs)
        out = []
        for i, (k, ok) in enumerate(zip(ks, present)):
            if not ok and not single[i]:
                out.append(torch.zeros_like(sd[i]))
            else:
                out.append(
                    sd[i]
                    if raw
                    else calibrate(sd[i], None if masks is None else masks[i], *calibration_factor(k, self.calibration))
                )
        return torch.stack(out)

    def highpass_draw(self, mean: torch.Tensor) -> torch.Tensor:
        """A single pair's stand-in for a noise draw (B, 1, ...): the pair minus its Gaussian blur."""
        smooth = GaussianSmooth(mean.dim() - 2, list(self.highpass)[: mean.dim() - 2]).to(mean.device)
        return mean - smooth(mean)

    def __call__(self, engine: Engine) -> None:
        if self.draws <= 0:
            return
        batch, output = engine.state.batch, engine.state.output
        batch = batch if isinstance(batch, list) else [batch]
        output = output if isinstance(output, list) else [output]
        wanted = []
        for i, (b, o) in enumerate(zip(batch, output)):
            if b.get("error") or "pred" not in o:
                continue
            if len(json.loads(b.get("input_pairs") or "[]")) < 2 and not self.single_pair:
                o[f"{self.output_key}_note"] = SINGLE_PAIR_REASON
                continue
            wanted.append(i)
        if not wanted:
            return
        network = engine.network  # type: ignore[attr-defined]
        device = next(network.parameters()).device
        # every item goes in, in batch order: per-scan adaptation's network runs item i through copy i
        images = torch.stack([torch.as_tensor(b["image"]) for b in batch]).to(device, torch.float32)
        scales = [float(np.asarray(b["scale"])) for b in batch]
        pred = torch.stack([torch.as_tensor(o["pred"]) / s for o, s in zip(output, scales)]).to(device, torch.float32)
        pairs = [self._pairs(b, s) if i in wanted else None for i, (b, s) in enumerate(zip(batch, scales))]
        masks = None
        if all(b.get("mask") is not None for b in batch):
            masks = torch.stack([torch.as_tensor(b["mask"]).reshape(1, *images.shape[2:]) for b in batch]).to(device)
        with evaluating(network):
            sd = self.sd_map(network, images, pred, pairs, masks=masks)
        if sd is None:
            return
        for i in wanted:
            output[i][self.output_key] = (sd[i] * scales[i]).cpu()
            output[i][f"{self.output_key}_info"] = json.dumps(self.describe(len(pairs[i])))  # type: ignore[arg-type]

    def item_sd(
        self, network: torch.nn.Module, item: Mapping[str, Any], image: torch.Tensor, pred: torch.Tensor
    ) -> tuple[np.ndarray | None, dict[str, Any]]:
        """One series outside an Ignite run (the MONAI Deploy app): ``item`` as the bundle's transforms
        made it, ``image`` (1, C, ...) what the network saw and ``pred`` (1, 1, ...) its output, both in
        normalised units. Returns the calibrated SD map (X, Y, Z) in the input's units and its sidecar
        fields, or None and the reason there is none (a single pair)."""
        scale = float(np.asarray(item["scale"]))
        k = len(json.loads(item.get("input_pairs") or "[]"))
        if self.draws <= 0:
            return None, {"UncertaintyMapNotWrittenReason": "SD maps turned off"}
        if k < 2 and not self.single_pair:
            return None, {"UncertaintyMapNotWrittenReason": SINGLE_PAIR_REASON}
        mask = item.get("mask")
        masks = None if mask is None else torch.as_tensor(np.asarray(mask)).reshape(1, 1, *image.shape[2:])
        with evaluating(network):
            sd = self.sd_map(network, image, pred, [self._pairs(dict(item), scale)], masks=masks)
        if sd is None:
            return None, {"UncertaintyMapNotWrittenReason": SINGLE_PAIR_REASON}
        return (sd[0, 0] * scale).cpu().numpy().astype(np.float32), self.describe(k)

    def _pairs(self, item: dict, scale: float) -> np.ndarray:
        """The item's input pairs in normalised units (only their count is used for one draw)."""
        used = json.loads(item["input_pairs"])
        if self.draws <= 1 or len(used) < 2:
            return np.zeros((len(used), 1, 1, 1), np.float32)
        pairs = item["pairs"]
        pairs = pairs.cpu().numpy() if isinstance(pairs, torch.Tensor) else np.asarray(pairs)
        return pairs[used].astype(np.float32) / scale
