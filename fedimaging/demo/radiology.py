"""Synthetic abdominal CT series with label maps, one patient per case, with per-site differences.

Layout under ``out``::

    dicom/<case>/<one file per slice>   axial CT series (CT Image Storage), one series per case
    labels/<case>_seg.nii.gz            label map on the grid of that series, with a RAS affine

The label file name is the case folder name plus ``_seg``, the naming rule of
``fedimaging prepare dicom --labels FOLDER``. Label values (``LABELS``): 0 background, 1 liver
(without its lesions), 2 aorta, 3 liver lesion.

The phantom has a body ellipse with a subcutaneous fat ring, a liver ellipsoid on the patient's right
with one or two lesions, an aorta in front of the spine, and vertebrae with discs. It is defined in
patient coordinates (LPS, millimetres) and sampled at voxel centres, so every voxel of a label has
exactly that tissue's value before the site's shift and noise are added. Nominal values are in
``TISSUE_HU``. Shapes vary per case. The phantom scales with the field of view, so with the default
96 mm field of view it is a miniature abdomen, roughly a quarter of an adult's width.

Sites differ the way real archives do (``SITE_PROFILES``, chosen by ``site_index`` modulo 3). They
differ in vendor headers, slice order, pixel spacing and slice thickness, rescale intercept, signed or
unsigned storage, transfer syntax (uncompressed, RLE Lossless, JPEG 2000 Lossless), intensity shift
and noise level. Instance 1 is the most superior slice at head-first sites and the most inferior at
feet-first sites.

``variation="strong"`` (used by the federated-versus-pooled benchmark, not by ``fedimaging demo``)
adds the differences that make a model trained at one hospital fail at another (``SiteAppearance``):
contrast phase (liver, lesion and aorta HU), reconstruction kernel blur, a wider range of spacings
and noise levels, patient size, and larger lesions. Every ``site_index`` gets its own appearance:
the first three are fixed, later ones are drawn from a generator seeded by the site index.

All identifiers are made up (``DEMO^SITE1^CASE001``). UIDs come from pydicom's ``generate_uid`` with
entropy from the seed, so the same arguments give byte-identical files with the same versions of
pydicom, its encoders and nibabel.
"""

from __future__ import annotations

import copy
import datetime
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, UID, generate_uid

LABELS = {"liver": 1, "aorta": 2, "lesion": 3}
TISSUE_HU = {
    "air": -1000.0, "fat": -100.0, "soft_tissue": 40.0, "liver": 60.0, "lesion": 20.0,
    "aorta": 200.0, "bone": 700.0, "disc": 80.0,
}
# A site with these spacings gets image_size x image_size x n_slices voxels. The other sites scale the
# matrix so that every site covers the same field of view.
REFERENCE_PIXEL_MM = 1.0
REFERENCE_SLICE_MM = 2.5
_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Encoder plugins are fixed, because pydicom otherwise takes the first one installed and plugins may
# encode the same pixels into different bytes.
_ENCODING_PLUGINS = {RLELossless: "pydicom", JPEG2000Lossless: "pylibjpeg"}


@dataclass(frozen=True)
class SiteProfile:
    """Scanner, reconstruction and export settings of one demo site (vendor names are fictional)."""

    manufacturer: str
    model: str
    software_versions: str
    convolution_kernel: str
    pixel_spacing_mm: float
    slice_thickness_mm: float
    patient_position: str  # "HFS" or "FFS", which sets the order of InstanceNumber along z
    rescale_intercept: float
    pixel_representation: int  # 0 unsigned, 1 signed (two's complement)
    bits_stored: int
    transfer_syntax: str
    hu_shift: float
    noise_sigma_hu: float
    window_center: tuple[float, ...]
    window_width: tuple[float, ...]
    file_name: str  # format string with the fields {instance} and {sop_uid}


SITE_PROFILES = (
    SiteProfile(
        manufacturer="NORTHWIND MEDICAL SYSTEMS", model="NW Helix 64", software_versions="nwct_4.2.1",
        convolution_kernel="SOFT", pixel_spacing_mm=0.8, slice_thickness_mm=2.0, patient_position="HFS",
        rescale_intercept=-1024.0, pixel_representation=0, bits_stored=12, transfer_syntax=ExplicitVRLittleEndian,
        hu_shift=0.0, noise_sigma_hu=5.0, window_center=(40.0,), window_width=(400.0,),
        file_name="IM-0001-{instance:04d}.dcm",
    ),
    SiteProfile(
        manufacturer="Contoso Healthcare", model="Contoso Aquila 128", software_versions="VB20A",
        convolution_kernel="BODY-2", pixel_spacing_mm=1.0, slice_thickness_mm=2.5, patient_position="FFS",
        rescale_intercept=-1000.0, pixel_representation=1, bits_stored=16, transfer_syntax=RLELossless,
        hu_shift=15.0, noise_sigma_hu=10.0, window_center=(50.0,), window_width=(350.0,),
        file_name="{instance:08d}",
    ),
    SiteProfile(
        manufacturer="Fabrikam Imaging", model="Fabrikam Orion One", software_versions="V8.3.0.1",
        convolution_kernel="ABD-SMOOTH", pixel_spacing_mm=1.2, slice_thickness_mm=3.0, patient_position="HFS",
        rescale_intercept=-1024.0, pixel_representation=1, bits_stored=12, transfer_syntax=JPEG2000Lossless,
        hu_shift=-10.0, noise_sigma_hu=15.0, window_center=(40.0, 400.0), window_width=(400.0, 1500.0),
        file_name="CT.{sop_uid}.dcm",
    ),
)


def site_profile(site_index: int) -> SiteProfile:
    """Return the profile of a site. Profiles repeat every ``len(SITE_PROFILES)`` sites."""
    return SITE_PROFILES[site_index % len(SITE_PROFILES)]


VARIATIONS = ("demo", "strong")


@dataclass(frozen=True)
class SiteAppearance:
    """Image appearance of one site: contrast phase, reconstruction, population and lesion size.

    ``tissue_hu`` contains the nominal HU of the enhancing tissues (liver, lesion, aorta) before the
    site's ``hu_shift``; other tissues keep ``TISSUE_HU``. ``blur_sigma_mm`` is the Gaussian standard
    deviation of the reconstruction kernel (in-plane, through-plane). ``anatomy_scale`` scales the body
    and its organs relative to the field of view, and ``lesion_radius`` is the range of lesion radii as
    fractions of the reference field of view.
    """

    phase: str
    tissue_hu: tuple[tuple[str, float], ...]
    pixel_spacing_mm: float
    slice_thickness_mm: float
    hu_shift: float
    noise_sigma_hu: float
    blur_sigma_mm: tuple[float, float]
    anatomy_scale: float
    lesion_radius: tuple[float, float]


DEMO_APPEARANCE_LESION_RADIUS = (0.035, 0.06)
# The three contrast phases of the strong variation. Arterial-phase lesions enhance above the liver
# (as hepatocellular carcinoma does), portal-venous and unenhanced lesions stay below it.
_PHASE_HU = {
    "arterial": {"liver": 70.0, "lesion": 150.0, "aorta": 320.0},
    "portal venous": {"liver": 125.0, "lesion": 50.0, "aorta": 170.0},
    "unenhanced": {"liver": 60.0, "lesion": 5.0, "aorta": 45.0},
}
STRONG_APPEARANCES = (
    SiteAppearance(phase="arterial", tissue_hu=tuple(_PHASE_HU["arterial"].items()), pixel_spacing_mm=0.7,
                   slice_thickness_mm=1.5, hu_shift=0.0, noise_sigma_hu=8.0, blur_sigma_mm=(0.0, 0.0),
                   anatomy_scale=1.0, lesion_radius=(0.07, 0.1)),
    SiteAppearance(phase="portal venous", tissue_hu=tuple(_PHASE_HU["portal venous"].items()), pixel_spacing_mm=1.0,
                   slice_thickness_mm=3.0, hu_shift=25.0, noise_sigma_hu=20.0, blur_sigma_mm=(0.8, 1.2),
                   anatomy_scale=1.12, lesion_radius=(0.07, 0.1)),
    SiteAppearance(phase="unenhanced", tissue_hu=tuple(_PHASE_HU["unenhanced"].items()), pixel_spacing_mm=1.4,
                   slice_thickness_mm=5.0, hu_shift=-30.0, noise_sigma_hu=30.0, blur_sigma_mm=(1.2, 2.0),
                   anatomy_scale=0.85, lesion_radius=(0.07, 0.1)),
)


def site_appearance(site_index: int, variation: str) -> SiteAppearance | None:
    """Return the strong-variation appearance of a site, or None for the demo's variation.

    Sites 0 to 2 get ``STRONG_APPEARANCES``. Later sites mix the three phases with weights, spacings,
    noise, blur and size drawn from a generator seeded by ``site_index``, so each site differs.
    """
    if variation not in VARIATIONS:
        raise ValueError(f"invalid variation {variation!r}: use one of {', '.join(VARIATIONS)}")
    if variation == "demo":
        return None
    if site_index < len(STRONG_APPEARANCES):
        return STRONG_APPEARANCES[site_index]
    rng = np.random.default_rng(np.random.SeedSequence([20240917, site_index]))
    weights = rng.dirichlet(np.full(len(_PHASE_HU), 0.5))
    mixed = {tissue: round(float(sum(w * hu[tissue] for w, hu in zip(weights, _PHASE_HU.values()))), 1)
             for tissue in ("liver", "lesion", "aorta")}
    if abs(mixed["lesion"] - mixed["liver"]) < 40.0:
        # A lesion within 40 HU of its liver is hardly visible at these noise levels, so it is kept hypodense.
        mixed["lesion"] = mixed["liver"] - 45.0
    phase = max(zip(weights, _PHASE_HU), key=lambda pair: pair[0])[1]
    return SiteAppearance(
        phase=f"mostly {phase}", tissue_hu=tuple(mixed.items()),
        pixel_spacing_mm=float(rng.choice([0.7, 0.8, 1.0, 1.2, 1.4])),
        slice_thickness_mm=float(rng.choice([1.5, 2.0, 3.0, 5.0])),
        hu_shift=round(float(rng.uniform(-30.0, 30.0)), 1), noise_sigma_hu=round(float(rng.uniform(5.0, 30.0)), 1),
        blur_sigma_mm=(round(float(rng.uniform(0.0, 1.2)), 2), round(float(rng.uniform(0.0, 2.0)), 2)),
        anatomy_scale=round(float(rng.uniform(0.85, 1.12)), 3), lesion_radius=(0.07, 0.1),
    )


@dataclass(frozen=True)
class _Phantom:
    """Shape parameters of one case in patient coordinates (LPS, mm)."""

    body_y: float
    body_axes: tuple[float, float]
    fat_mm: float
    spine_y: float
    spine_radius: float
    process_y: float
    process_radius: float
    disc_period: float
    disc_phase: float
    aorta_xy: tuple[float, float]
    aorta_radius: float
    aorta_sway: float
    liver_centre: tuple[float, float, float]
    liver_axes: tuple[float, float, float]
    liver_angle: float
    lesions: tuple[tuple[float, float, float, float], ...]  # (x, y, z, radius) of each sphere
    z_centre: float
    z_extent: float


def _draw_phantom(rng: np.random.Generator, fov: float, z_centre: float, z_extent: float,
                  lesion_radius: tuple[float, float] = DEMO_APPEARANCE_LESION_RADIUS,
                  lesion_fov: float | None = None) -> _Phantom:
    """Draw one case's shapes, sized as fractions of the field of view ``fov`` and of ``z_extent``.

    Lesion radii are ``lesion_radius`` fractions of ``lesion_fov`` (default ``fov``).
    """
    lesion_fov = fov if lesion_fov is None else lesion_fov
    body_y = fov * 0.02
    body_axes = (fov * 0.42 * rng.uniform(0.95, 1.03), fov * 0.31 * rng.uniform(0.92, 1.05))
    fat_mm = fov * rng.uniform(0.035, 0.05)
    spine_radius = fov * 0.055
    spine_y = body_y + body_axes[1] - fat_mm - fov * 0.02 - 2.2 * spine_radius
    aorta_radius = fov * rng.uniform(0.035, 0.045)
    aorta_xy = (fov * rng.uniform(0.03, 0.06), spine_y - spine_radius - aorta_radius - fov * 0.01)

    # The liver sits on the patient's right (negative x in LPS), above the middle of the scanned range,
    # so a left-right or a head-feet flip of the labels moves it onto other tissue.
    liver_centre = (-fov * rng.uniform(0.15, 0.19), body_y - fov * rng.uniform(0.0, 0.04),
                    z_centre + z_extent * rng.uniform(0.1, 0.2))
    liver_axes = (fov * rng.uniform(0.13, 0.16), fov * rng.uniform(0.11, 0.14), z_extent * rng.uniform(0.25, 0.32))
    liver_angle = rng.uniform(-0.35, 0.35)
    lesions = []
    for _ in range(int(rng.integers(1, 3))):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        u, v, w = direction * rng.uniform(0.0, 0.5) * np.array(liver_axes)
        cos, sin = np.cos(liver_angle), np.sin(liver_angle)
        lesions.append((liver_centre[0] + cos * u - sin * v, liver_centre[1] + sin * u + cos * v,
                        liver_centre[2] + w, lesion_fov * rng.uniform(*lesion_radius)))
    return _Phantom(
        body_y=body_y, body_axes=body_axes, fat_mm=fat_mm, spine_y=spine_y, spine_radius=spine_radius,
        process_y=spine_y + 1.6 * spine_radius, process_radius=0.5 * spine_radius,
        disc_period=z_extent / 5.0, disc_phase=rng.uniform(0.0, z_extent / 5.0),
        aorta_xy=aorta_xy, aorta_radius=aorta_radius, aorta_sway=fov * rng.uniform(0.01, 0.03),
        liver_centre=liver_centre, liver_axes=liver_axes, liver_angle=liver_angle,
        lesions=tuple(lesions), z_centre=z_centre, z_extent=z_extent,
    )


def _render(p: _Phantom, x: np.ndarray, y: np.ndarray, z: np.ndarray,
            tissue_hu: dict[str, float] = TISSUE_HU) -> tuple[np.ndarray, np.ndarray]:
    """Return HU (float32, values from ``tissue_hu``) and label values (uint8) at the points (x, y, z), which broadcast."""
    shape = np.broadcast_shapes(x.shape, y.shape, z.shape)
    hu = np.full(shape, tissue_hu["air"], dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)

    a, b = p.body_axes
    outer = np.broadcast_to((x / a) ** 2 + ((y - p.body_y) / b) ** 2 <= 1.0, shape)
    inner = np.broadcast_to((x / (a - p.fat_mm)) ** 2 + ((y - p.body_y) / (b - p.fat_mm)) ** 2 <= 1.0, shape)
    hu[outer] = tissue_hu["fat"]
    hu[inner] = tissue_hu["soft_tissue"]

    cos, sin = np.cos(p.liver_angle), np.sin(p.liver_angle)
    dx, dy, dz = x - p.liver_centre[0], y - p.liver_centre[1], z - p.liver_centre[2]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    ax, ay, az = p.liver_axes
    liver = inner & ((u / ax) ** 2 + (v / ay) ** 2 + (dz / az) ** 2 <= 1.0)
    lesion = np.zeros(shape, dtype=bool)
    for lx, ly, lz, radius in p.lesions:
        lesion |= (x - lx) ** 2 + (y - ly) ** 2 + (z - lz) ** 2 <= radius ** 2
    lesion &= liver
    hu[liver], labels[liver] = tissue_hu["liver"], LABELS["liver"]
    hu[lesion], labels[lesion] = tissue_hu["lesion"], LABELS["lesion"]

    # The aorta curves sideways along z, so it is not symmetric under a head-feet flip either.
    aorta_x = p.aorta_xy[0] + p.aorta_sway * np.sin(np.pi * (z - p.z_centre) / p.z_extent)
    aorta = np.broadcast_to((x - aorta_x) ** 2 + (y - p.aorta_xy[1]) ** 2 <= p.aorta_radius ** 2, shape)
    hu[aorta], labels[aorta] = tissue_hu["aorta"], LABELS["aorta"]

    vertebra = np.broadcast_to(x ** 2 + (y - p.spine_y) ** 2 <= p.spine_radius ** 2, shape)
    process = np.broadcast_to(x ** 2 + (y - p.process_y) ** 2 <= p.process_radius ** 2, shape)
    disc = vertebra & np.broadcast_to(np.mod(z - p.disc_phase, p.disc_period) < 0.2 * p.disc_period, shape)
    hu[vertebra | process], labels[vertebra | process] = tissue_hu["bone"], 0
    hu[disc] = tissue_hu["disc"]
    return hu, labels


def _uid(seed: int, *parts: object) -> UID:
    # generate_uid joins its entropy sources without a separator, so the parts are joined here.
    return generate_uid(entropy_srcs=["fedimaging-demo/" + "/".join(str(p) for p in [seed, *parts])])


def _storage_range(profile: SiteProfile) -> tuple[int, int]:
    if profile.pixel_representation == 1:
        return -(1 << (profile.bits_stored - 1)), (1 << (profile.bits_stored - 1)) - 1
    return 0, (1 << profile.bits_stored) - 1


def _series_dataset(profile: SiteProfile, site: int, case: int, seed: int, matrix: tuple[int, int]) -> Dataset:
    """Attributes shared by all instances of one case's series."""
    date = (datetime.date(2000, 1, 1) + datetime.timedelta(days=case - 1)).strftime("%Y%m%d")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage

    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "120000"
    ds.AccessionNumber = f"DEMO{site}{case:04d}"
    ds.Modality = "CT"
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = f"Demo Site {site}"
    ds.ReferringPhysicianName = ""

    ds.StudyDescription = "DEMO ABDOMEN"
    ds.SeriesDescription = f"DEMO ABDOMEN {profile.slice_thickness_mm:g} mm {profile.convolution_kernel}"
    ds.ManufacturerModelName = profile.model
    ds.PatientName = f"DEMO^SITE{site}^CASE{case:03d}"
    ds.PatientID = f"DEMO-S{site}-C{case:03d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "ABDOMEN"

    ds.SliceThickness = profile.slice_thickness_mm
    ds.KVP = 120
    ds.SoftwareVersions = profile.software_versions
    ds.ReconstructionDiameter = round(matrix[0] * profile.pixel_spacing_mm, 3)
    ds.ConvolutionKernel = profile.convolution_kernel
    ds.PatientPosition = profile.patient_position

    ds.StudyInstanceUID = _uid(seed, site, case, "study")
    ds.SeriesInstanceUID = _uid(seed, site, case, "series")
    ds.StudyID = f"{case}"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = _uid(seed, site, case, "frame-of-reference")
    ds.PositionReferenceIndicator = ""

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = matrix[1], matrix[0]
    ds.PixelSpacing = [profile.pixel_spacing_mm, profile.pixel_spacing_mm]
    ds.BitsAllocated = 16
    ds.BitsStored = profile.bits_stored
    ds.HighBit = profile.bits_stored - 1
    ds.PixelRepresentation = profile.pixel_representation

    ds.WindowCenter = list(profile.window_center) if len(profile.window_center) > 1 else profile.window_center[0]
    ds.WindowWidth = list(profile.window_width) if len(profile.window_width) > 1 else profile.window_width[0]
    ds.RescaleIntercept = profile.rescale_intercept
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    return ds


def _site_matrix(profile: SiteProfile, image_size: int, n_slices: int) -> tuple[int, int]:
    """Return the in-plane size and slice count that keep the reference field of view at this site."""
    size = max(8, round(image_size * REFERENCE_PIXEL_MM / profile.pixel_spacing_mm))
    slices = max(4, round(n_slices * REFERENCE_SLICE_MM / profile.slice_thickness_mm))
    return size, slices


def _write_series(series_dir: Path, base: Dataset, profile: SiteProfile, stored: np.ndarray,
                  origin_xy: tuple[float, float], z_instance: np.ndarray, sop_uids: list[UID],
                  file_names: list[str]) -> None:
    """Write one file per slice; ``stored`` is indexed (column, row, instance)."""
    if series_dir.is_dir():
        stale = sorted({p.name for p in series_dir.iterdir()} - set(file_names))
        if stale:
            raise FileExistsError(
                f"{series_dir} contains files that this run does not write (for example {stale[0]}), so the "
                "series would mix two runs; delete the folder or choose an empty output folder"
            )
    series_dir.mkdir(parents=True, exist_ok=True)

    for k, (sop_uid, file_name) in enumerate(zip(sop_uids, file_names)):
        ds = copy.deepcopy(base)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(origin_xy[0]), float(origin_xy[1]), float(z_instance[k])]
        ds.SliceLocation = float(z_instance[k])
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        if profile.transfer_syntax != ExplicitVRLittleEndian:
            # By default compress() also replaces the SOP Instance UID with a random one.
            ds.compress(profile.transfer_syntax, encoding_plugin=_ENCODING_PLUGINS[profile.transfer_syntax],
                        generate_instance_uid=False)
        ds.save_as(series_dir / file_name, enforce_file_format=True)


def _write_label(path: Path, labels: np.ndarray, spacing: float, origin_xy: tuple[float, float],
                 z_instance: np.ndarray, thickness: float) -> None:
    """Write the label map, indexed (column, row, instance), as NIfTI with the series' RAS affine.

    The affine steps along z in instance order, as the series does. prepare dicom then resamples
    the labels onto its own slice order in patient space.
    """
    affine_lps = np.eye(4)
    affine_lps[0, 0], affine_lps[1, 1] = spacing, spacing
    affine_lps[2, 2] = z_instance[1] - z_instance[0] if len(z_instance) > 1 else thickness
    affine_lps[:3, 3] = [origin_xy[0], origin_xy[1], z_instance[0]]
    affine_ras = _RAS_FROM_LPS @ affine_lps
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(labels, affine_ras)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine_ras, code=1)
    image.set_sform(affine_ras, code=1)
    nib.save(image, str(path))


def _write_case(out: Path, name: str, profile: SiteProfile, site: int, case: int, seed: int,
                image_size: int, n_slices: int, appearance: SiteAppearance | None = None) -> dict:
    entropy = np.random.SeedSequence([seed, site, case])
    shape_rng, noise_rng, table_rng = (np.random.default_rng(s) for s in entropy.spawn(3))

    spacing, thickness = profile.pixel_spacing_mm, profile.slice_thickness_mm
    size, slices = _site_matrix(profile, image_size, n_slices)
    fov, z_extent = size * spacing, slices * thickness
    # Table position and reconstruction centre differ per case, as in real studies. Rounding to 0.1 mm
    # keeps ImagePositionPatient short and exact in its decimal string.
    z_centre = round(float(table_rng.uniform(-400.0, -100.0)), 1)
    centre_xy = np.round(table_rng.uniform(-5.0, 5.0, size=2), 1)
    tissue_hu = TISSUE_HU
    if appearance is None:
        phantom = _draw_phantom(shape_rng, fov, z_centre, z_extent)
    else:
        # The anatomy is drawn in a field of view scaled by the patient size, so a larger patient fills
        # more of the image. Lesion sizes follow the reference field of view, not the patient.
        phantom = _draw_phantom(shape_rng, fov * appearance.anatomy_scale, z_centre, z_extent * appearance.anatomy_scale,
                                lesion_radius=appearance.lesion_radius, lesion_fov=image_size * REFERENCE_PIXEL_MM)
        tissue_hu = {**TISSUE_HU, **dict(appearance.tissue_hu)}

    x = centre_xy[0] - fov / 2 + spacing / 2 + spacing * np.arange(size)
    y = centre_xy[1] - fov / 2 + spacing / 2 + spacing * np.arange(size)
    z_ascending = z_centre - z_extent / 2 + thickness / 2 + thickness * np.arange(slices)
    x, y, z_ascending = (np.round(v, 3) for v in (x, y, z_ascending))
    hu, labels = _render(phantom, x[:, None, None], y[None, :, None], z_ascending[None, None, :], tissue_hu)
    if appearance is not None and max(appearance.blur_sigma_mm) > 0:
        from scipy.ndimage import gaussian_filter

        in_plane, through_plane = appearance.blur_sigma_mm
        hu = gaussian_filter(hu, sigma=(in_plane / spacing, in_plane / spacing, through_plane / thickness),
                             mode="nearest").astype(np.float32)

    # Instance k+1 is slice order[k]: superior first at head-first sites, inferior first at feet-first.
    order = np.arange(slices)[::-1] if profile.patient_position == "HFS" else np.arange(slices)
    hu = hu[:, :, order] + np.float32(profile.hu_shift)
    hu += noise_rng.normal(0.0, profile.noise_sigma_hu, size=hu.shape).astype(np.float32)
    low, high = _storage_range(profile)
    stored = np.clip(np.rint(hu - profile.rescale_intercept), low, high)
    stored = stored.astype(np.int16 if profile.pixel_representation == 1 else np.uint16)
    labels = labels[:, :, order]
    z_instance = z_ascending[order]

    series_dir = out / "dicom" / name
    sop_uids = [_uid(seed, site, case, "instance", k + 1) for k in range(slices)]
    file_names = [profile.file_name.format(instance=k + 1, sop_uid=sop_uids[k]) for k in range(slices)]
    base = _series_dataset(profile, site, case, seed, (size, size))
    _write_series(series_dir, base, profile, stored, (x[0], y[0]), z_instance, sop_uids, file_names)
    label_path = out / "labels" / f"{name}_seg.nii.gz"
    _write_label(label_path, labels, spacing, (x[0], y[0]), z_instance, thickness)

    return {
        "case": name,
        "series": str(series_dir),
        "label": str(label_path),
        "patient_id": str(base.PatientID),
        "files": slices,
        "lesions": len(phantom.lesions),
        "voxels_by_label": {key: int(np.count_nonzero(labels == value)) for key, value in LABELS.items()},
    }


def generate_radiology_site(out: Path, *, site_index: int, n_cases: int, seed: int, image_size: int = 96,
                            n_slices: int = 48, variation: str = "demo") -> dict:
    """Write one site's CT series under ``out/dicom`` and label maps under ``out/labels``.

    ``site_index`` (0, 1, 2, ...) picks the site profile and numbers the site (``site_index + 1`` in
    names and identifiers). ``image_size`` and ``n_slices`` are the matrix of a site with 1.0 mm pixels
    and 2.5 mm slices. Sites with other spacings scale them to cover the same field of view.
    ``variation`` is ``"demo"`` (the demo's sites) or ``"strong"``, which gives the site its own
    ``SiteAppearance`` on top of its profile (see the module documentation).
    Existing files of the same names are overwritten. Raises ``ValueError`` for invalid arguments and
    ``FileExistsError`` when a case folder contains files that this run would not write.

    Returns a JSON-serialisable summary: folders and per-case paths (as strings), label values, the
    expected HU of each labelled tissue at this site, and the site profile.
    """
    if site_index < 0:
        raise ValueError(f"invalid site_index {site_index}: must be 0 or more")
    if n_cases < 1:
        raise ValueError(f"invalid n_cases {n_cases}: must be at least 1")
    if seed < 0:
        raise ValueError(f"invalid seed {seed}: must be 0 or more")
    if image_size < 32:
        raise ValueError(f"invalid image_size {image_size}: must be at least 32 pixels")
    if n_slices < 8:
        raise ValueError(f"invalid n_slices {n_slices}: must be at least 8")

    appearance = site_appearance(site_index, variation)

    out = Path(out)
    profile = site_profile(site_index)
    tissue_hu = dict(TISSUE_HU)
    if appearance is not None:
        profile = replace(profile, pixel_spacing_mm=appearance.pixel_spacing_mm,
                          slice_thickness_mm=appearance.slice_thickness_mm, hu_shift=appearance.hu_shift,
                          noise_sigma_hu=appearance.noise_sigma_hu)
        tissue_hu.update(appearance.tissue_hu)
    site = site_index + 1
    cases = [
        _write_case(out, f"site{site}-case{case:03d}", profile, site, case, seed, image_size, n_slices, appearance)
        for case in range(1, n_cases + 1)
    ]
    size, slices = _site_matrix(profile, image_size, n_slices)
    profile_fields = asdict(profile)
    profile_fields["transfer_syntax_name"] = UID(profile.transfer_syntax).name
    return {
        "site_index": site_index,
        "site_name": f"site-{site}",
        "dicom": str(out / "dicom"),
        "labels": str(out / "labels"),
        "label_values": dict(LABELS),
        "expected_hu": {
            tissue: tissue_hu[tissue] + profile.hu_shift for tissue in ("liver", "aorta", "lesion", "soft_tissue")
        },
        "noise_sigma_hu": profile.noise_sigma_hu,
        "matrix": [size, size, slices],
        "spacing_mm": [profile.pixel_spacing_mm, profile.pixel_spacing_mm, profile.slice_thickness_mm],
        "profile": profile_fields,
        "variation": variation,
        "appearance": None if appearance is None else {**asdict(appearance), "tissue_hu": dict(appearance.tissue_hu)},
        "cases": cases,
    }
