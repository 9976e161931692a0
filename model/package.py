"""Model packages: a folder with a model card (model.json), weights (safetensors) and an ONNX export.

The card is the single source of what the pipeline needs to know about a model: label per output
channel, training frame, pixel spacing, tile size, normalisation numbers, architecture, provenance
and the SHA-256 of every file. Loading a package verifies those checksums. Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from common.labels import LABELS, NAMES
from common.errors import ModelPackageError

CARD_NAME = "model.json"
#: names of the ONNX export's input (batch, channels, tile_y, tile_x) and output (batch, classes, tile_y, tile_x)
INPUT_NAME = "image"
OUTPUT_NAME = "logits"

#: the layer settings nnU-Net's 2D plans use (bias, InstanceNorm, no dropout, LeakyReLU)
NNUNET_LAYERS = {
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Normalization:
    """nnU-Net's CT scheme: clip HU to [clip_low, clip_high], then (x - mean) / std."""

    scheme: str
    clip_low: float
    clip_high: float
    mean: float
    std: float


@dataclass(frozen=True)
class PackageFile:
    """One file of the package: its path relative to the package folder and its SHA-256 (empty until written)."""

    path: str
    sha256: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PackageFile":
        if not isinstance(data, Mapping) or not isinstance(data.get("path"), str) or not data["path"]:
            raise ValueError(f"a file entry must be {{'path': str, 'sha256': str}}, got {data!r}"[:200])
        sha = data.get("sha256", "")
        if not isinstance(sha, str) or (sha and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha))):
            raise ValueError(f"file {data['path']!r}: sha256 must be 64 lower-case hex digits")
        return cls(path=data["path"], sha256=sha)

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "sha256": self.sha256}


#: the fields every precision record has; a record's other entries (per_volume, reference, data, measured_with,
#: machine: what model/precision.py measured) are kept in `details` as written
_RECORD_FIELDS = ("holds", "voxel_agreement", "min_dice", "labels_compared")


@dataclass(frozen=True)
class PrecisionRecord:
    """A reduced-precision mode measured against fp32 on this model (model/precision.py); it runs by default only where it holds."""

    holds: bool
    voxel_agreement: float  # fraction of voxels with the fp32 label
    min_dice: float  # lowest per-label Dice against fp32
    labels_compared: int = 0
    details: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PrecisionRecord":
        if not isinstance(data, Mapping):
            raise ValueError(f"a precision record must be an object, got {type(data).__name__}")
        if not isinstance(data.get("holds"), bool):
            raise ValueError("a precision record needs 'holds': true|false")
        voxels, dice = float(data["voxel_agreement"]), float(data["min_dice"])
        if not 0 <= voxels <= 1 or not (0 <= dice <= 1 or dice != dice):  # min_dice is NaN when no label was compared
            raise ValueError(f"voxel_agreement and min_dice must be fractions in [0, 1], got {voxels} and {dice}")
        return cls(holds=data["holds"], voxel_agreement=voxels, min_dice=dice, labels_compared=int(data.get("labels_compared", 0)),
                   details={k: v for k, v in data.items() if k not in _RECORD_FIELDS})

    def to_dict(self) -> dict[str, Any]:
        return {"holds": self.holds, "voxel_agreement": self.voxel_agreement, "min_dice": self.min_dice,
                "labels_compared": self.labels_compared, **self.details}


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    description: str
    channel_labels: tuple[int, ...]  # canonical label value of each output channel; channel 0 is background
    frame: str  # axis frame the network was trained in (SimpleITK DICOMOrient code), e.g. "LPS"
    pixel_spacing_mm: tuple[float, float]  # (x, y) in the model frame
    tile_size: tuple[int, int]  # (y, x)
    normalization: Normalization
    network_class_name: str
    arch_kwargs: dict
    input_channels: int = 1
    tile_step_size: float = 0.5
    gaussian_sigma_scale: float = 0.125
    mirroring: bool = False
    files: Mapping[str, PackageFile] = field(default_factory=dict)  # role ("weights", "onnx", "onnx_int8") -> file
    provenance: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    #: reduced-precision modes measured against fp32 on this model (model/precision.py), by runner key ("openvino-bf16")
    precision_agreement: Mapping[str, PrecisionRecord] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # plain mappings (a card built in code, or read from JSON) become the typed entries; a malformed one raises
        # ValueError, which from_dict turns into a ModelPackageError naming the card
        files = {str(role): entry if isinstance(entry, PackageFile) else PackageFile.from_dict(entry) for role, entry in self.files.items()}
        records = {str(key): record if isinstance(record, PrecisionRecord) else PrecisionRecord.from_dict(record)
                   for key, record in self.precision_agreement.items()}
        object.__setattr__(self, "files", files)
        object.__setattr__(self, "precision_agreement", records)

    @property
    def num_classes(self) -> int:
        return len(self.channel_labels)

    @property
    def identity(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["normalization"] = asdict(self.normalization)
        data["files"] = {role: entry.to_dict() for role, entry in self.files.items()}
        data["precision_agreement"] = {key: record.to_dict() for key, record in self.precision_agreement.items()}
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path) -> "ModelCard":
        try:
            return cls(
                name=str(data["name"]),
                version=str(data["version"]),
                description=str(data.get("description", "")),
                channel_labels=tuple(int(v) for v in data["channel_labels"]),
                frame=str(data["frame"]).upper(),
                pixel_spacing_mm=tuple(float(v) for v in data["pixel_spacing_mm"]),
                tile_size=tuple(int(v) for v in data["tile_size"]),
                normalization=Normalization(**{k: float(v) if k != "scheme" else str(v) for k, v in dict(data["normalization"]).items()}),
                network_class_name=str(data["network_class_name"]),
                arch_kwargs=_mapping(data["arch_kwargs"], "arch_kwargs"),
                input_channels=int(data.get("input_channels", 1)),
                tile_step_size=float(data.get("tile_step_size", 0.5)),
                gaussian_sigma_scale=float(data.get("gaussian_sigma_scale", 0.125)),
                mirroring=bool(data.get("mirroring", False)),
                files=_mapping(data.get("files", {}), "files"),
                provenance=_mapping(data.get("provenance", {}), "provenance"),
                metrics=_mapping(data.get("metrics", {}), "metrics"),
                precision_agreement=_mapping(data.get("precision_agreement", {}), "precision_agreement"),
            )
        except KeyError as error:
            raise ModelPackageError(f"{source}: invalid model card (missing {error})") from None
        except (TypeError, ValueError) as error:
            raise ModelPackageError(f"{source}: invalid model card ({error})") from None

    def check(self, source: Path) -> None:
        if len(self.pixel_spacing_mm) != 2 or min(self.pixel_spacing_mm) <= 0:
            raise ModelPackageError(f"{source}: pixel_spacing_mm must be two positive numbers")
        if len(self.tile_size) != 2 or min(self.tile_size) < 8:
            raise ModelPackageError(f"{source}: tile_size must be two integers >= 8")
        if not self.channel_labels or self.channel_labels[0] != 0 or len(set(self.channel_labels)) != len(self.channel_labels):
            raise ModelPackageError(f"{source}: channel_labels must start with background 0 and be unique")
        unknown = [v for v in self.channel_labels[1:] if v not in NAMES]
        if unknown:
            raise ModelPackageError(f"{source}: channel_labels {unknown} are not canonical labels (1..{len(LABELS)})")
        if self.normalization.scheme != "CT" or self.normalization.std <= 0:
            raise ModelPackageError(f"{source}: only nnU-Net's CT normalisation with std > 0 is supported")
        if not 0 < self.tile_step_size <= 1:
            raise ModelPackageError(f"{source}: tile_step_size must be in (0, 1]")


def _mapping(value: Any, name: str) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be an object, got {type(value).__name__}")
    return dict(value)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelPackage:
    folder: Path
    card: ModelCard

    def path_of(self, role: str) -> Path:
        entry = self.card.files.get(role)
        if entry is None:
            raise ModelPackageError(f"{self.folder / CARD_NAME}: the package has no {role!r} file")
        return self.folder / entry.path


def load_model_package(folder: Path, *, verify: bool = True) -> ModelPackage:
    """Read and check a model package; with `verify`, every listed file must match its SHA-256."""
    folder = Path(folder)
    card_path = folder / CARD_NAME
    if not card_path.is_file():
        raise ModelPackageError(f"{folder}: not a model package (no {CARD_NAME})")
    try:
        data = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelPackageError(f"{card_path}: unreadable model card ({error})") from None
    if not isinstance(data, dict):
        raise ModelPackageError(f"{card_path}: invalid model card (a JSON object expected, got {type(data).__name__})")
    if data.get("format_version") != FORMAT_VERSION:
        raise ModelPackageError(f"{card_path}: unsupported format_version {data.get('format_version')!r}")
    card = ModelCard.from_dict(data, card_path)
    card.check(card_path)
    for role, entry in card.files.items():
        path = folder / entry.path
        if Path(entry.path).is_absolute() or ".." in Path(entry.path).parts:
            raise ModelPackageError(f"{card_path}: file path {entry.path!r} leaves the package folder")
        if not path.is_file():
            raise ModelPackageError(f"{card_path}: {role} file {entry.path} is missing")
        if verify and sha256_of(path) != entry.sha256:
            raise ModelPackageError(f"{path}: SHA-256 does not match the model card (corrupt or altered)")
    return ModelPackage(folder, card)


def write_model_card(card: ModelCard, folder: Path) -> Path:
    """Write model.json with checksums of the files the card lists (paths relative to `folder`)."""
    folder = Path(folder)
    files = {role: PackageFile(entry.path, sha256_of(folder / entry.path)) for role, entry in card.files.items()}
    data = {"format_version": FORMAT_VERSION, **replace(card, files=files).to_dict()}
    path = folder / CARD_NAME
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


#: the bundled demo model's name (model/packages/demo-phantom): trained on synthetic phantoms only
DEMO_MODEL_NAME = "trunkseg-demo-phantom"
PHANTOM_WARNING = ("segmented with the bundled demo model, trained on synthetic phantoms only: these masks and measures say "
                   "nothing about a patient (give --model, $TRUNKSEG_MODEL, or mount a real model package at /opt/ml/model)")


def is_phantom_only(card: ModelCard) -> bool:
    """The bundled phantom-only demo model (by its card's name, wherever the package was copied to)."""
    return card.name == DEMO_MODEL_NAME


def find_mounted_package(mount: Path) -> Path | None:
    """The model package in a model mount (Grand Challenge's /opt/ml/model): the mount itself, or the one folder
    below it that holds a model card (what a tarball with a top folder unpacks to).

    None when the mount is missing or empty. A mount that holds something, but no model card there or one
    folder down, is a ModelPackageError naming what it holds: never a silent fall-back to the phantom model.
    """
    mount = Path(mount)
    if (mount / CARD_NAME).is_file():
        return mount
    if not mount.is_dir():
        return None
    try:
        entries = sorted(mount.iterdir())
    except OSError as error:
        raise ModelPackageError(f"{mount}: model mount cannot be listed ({error.strerror})") from None
    if not entries:
        return None
    packages = [p for p in entries if p.is_dir() and (p / CARD_NAME).is_file()]
    if len(packages) == 1:
        return packages[0]
    names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in (packages or entries)[:8]) + (", ..." if len(packages or entries) > 8 else "")
    if packages:
        raise ModelPackageError(f"{mount}: holds {len(packages)} model packages ({names}); expected one")
    raise ModelPackageError(f"{mount}: holds {names} but no model card ({CARD_NAME}) there or one folder down; "
                            f"refusing to fall back to the bundled phantom-only demo model")
