"""Sweep every file of the DICOM corpus and of pydicom's own test files through ``prepare_dicom``.

The tables below pin the outcome of each file: a prepared image, or the reason code it is
rejected, excluded or skipped with. Outcome notation:

* ``"volume 512x512x1"`` or ``"image2d 640x400x3"``: one case of that kind and array shape
  (x, y[, z][, RGB]).
* a reason code from ``preprocessing.reasons.Reason``, such as ``"no_decoder"``.
* ``"DEFAULT | WITH_OPTIONS"``: the outcome without options, then the outcome with
  ``include_derived`` and ``include_localizers``, for images left out by default.
* several outcomes of one SOURCE are joined with ``", "`` in sorted order.

Keys of the corpus table are paths relative to ``dicom_corpus/``. A key ending in ``/`` is a
series folder prepared as one SOURCE, and any other key is one file prepared on its own. Keys of
the pydicom table are paths relative to pydicom's ``data/test_files`` folder and may contain ``*``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image

from preprocessing.dicom.headers import read_header
from preprocessing.dicom.pixels import decode_frames, physical_values
from preprocessing.prepare_dicom import PrepareOptions, prepare_dicom
from preprocessing.reasons import Reason

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CORPUS = DATA / "dicom_corpus"
# The files that ship inside the pydicom package. pydicom.data.get_testdata_files() is not used:
# it also downloads every file of the pydicom-data repository that is not cached yet.
PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"

CORPUS_OUTCOMES = {
    # Derived or secondary images (ImageType DERIVED or SECONDARY) are left out of training by default.
    "cornerstone/CT0012.fragmented_no_bot_jpeg_baseline.51.dcm": "derived | volume 512x512x2",
    "cornerstone/CT1_J2KR": "derived | volume 512x512x1",
    "cornerstone/CT2_J2KR": "derived | volume 512x512x1",
    "cornerstone/CTImage.dcm": "volume 512x512x1",
    "cornerstone/CTImage.dcm_BigEndianExplicitTransferSyntax_1.2.840.10008.1.2.2.dcm": "volume 512x512x1",
    "cornerstone/CTImage.dcm_DeflatedExplicitVRLittleEndianTransferSyntax_1.2.840.10008.1.2.1.99.dcm":
        "volume 512x512x1",
    "cornerstone/CTImage.dcm_JPEG2000LosslessOnlyTransferSyntax_1.2.840.10008.1.2.4.90.dcm": "volume 512x512x1",
    # The lossy encodings carry ImageType DERIVED; two of them pad it to 'DERIVED ' with a space.
    "cornerstone/CTImage.dcm_JPEG2000TransferSyntax_1.2.840.10008.1.2.4.91.dcm": "derived | volume 512x512x1",
    "cornerstone/CTImage.dcm_JPEGLSLosslessTransferSyntax_1.2.840.10008.1.2.4.80.dcm": "volume 512x512x1",
    "cornerstone/CTImage.dcm_JPEGLSLossyTransferSyntax_1.2.840.10008.1.2.4.81.dcm": "derived | volume 512x512x1",
    # pydicom has no decoder for the retired JPEG processes 10/12 and 6/8 with any plugin, so the
    # file is rejected at scan time (ImageType DERIVED is never reached).
    "cornerstone/CTImage.dcm_JPEGProcess10_12TransferSyntax_1.2.840.10008.1.2.4.55.dcm": "no_decoder",
    "cornerstone/CTImage.dcm_JPEGProcess14SV1TransferSyntax_1.2.840.10008.1.2.4.70.dcm": "volume 512x512x1",
    "cornerstone/CTImage.dcm_JPEGProcess14TransferSyntax_1.2.840.10008.1.2.4.57.dcm": "volume 512x512x1",
    "cornerstone/CTImage.dcm_JPEGProcess1TransferSyntax_1.2.840.10008.1.2.4.50.dcm": "derived | volume 512x512x1",
    "cornerstone/CTImage.dcm_JPEGProcess2_4TransferSyntax_1.2.840.10008.1.2.4.51.dcm": "derived | volume 512x512x1",
    "cornerstone/CTImage.dcm_JPEGProcess6_8TransferSyntax_1.2.840.10008.1.2.4.53.dcm": "no_decoder",
    "cornerstone/CTImage.dcm_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm": "volume 512x512x1",
    "cornerstone/CTImage.dcm_LittleEndianImplicitTransferSyntax_1.2.840.10008.1.2.dcm": "volume 512x512x1",
    "cornerstone/CTImage.dcm_RLELosslessTransferSyntax_1.2.840.10008.1.2.5.dcm": "volume 512x512x1",
    "cornerstone/LICENSE_cornerstone3D_MIT.txt": "not_dicom",
    # Secondary captures of one RGB test pattern: YBR JPEG, JPEG-LS, palette and plain RGB.
    "cornerstone/TestPattern_JPEG-Baseline_YBR422.dcm": "derived | image2d 640x400x3",
    "cornerstone/TestPattern_JPEG-Baseline_YBRFull.dcm": "derived | image2d 640x400x3",
    "cornerstone/TestPattern_JPEG-LS-Lossless.dcm": "derived | image2d 640x400x3",
    "cornerstone/TestPattern_JPEG-LS-NearLossless.dcm": "derived | image2d 640x400x3",
    "cornerstone/TestPattern_JPEG-Lossless_RGB.dcm": "derived | image2d 640x400x3",
    "cornerstone/TestPattern_Palette.dcm": "derived | image2d 640x400x3",
    "cornerstone/TestPattern_Palette_16.dcm": "derived | image2d 640x400x3",
    "cornerstone/TestPattern_RGB.dcm": "derived | image2d 640x400x3",
    "cornerstone/US-YBR_FULL_422-EVRLE.dcm": "derived | image2d 800x555x3",
    "cornerstone/no-pixel-data.dcm": "no_pixel_data",  # a Basic Text SR document
    # An ORIGINAL ultrasound frame in PALETTE COLOR (RLE), without PixelSpacing.
    "cornerstone/no-pixel-spacing.dcm": "image2d 800x600x3",
    "dcm_qa_ts/1.json": "not_dicom",
    "dcm_qa_ts/1.nii": "volume 64x64x35",
    # One Siemens MOSAIC image in nine transfer syntaxes: mosaics are not unpacked, so each is
    # rejected; the pixel values are compared by test_dcm_qa_ts_encodings_decode_alike.
    "dcm_qa_ts/In/1.dcm": "siemens_mosaic",
    "dcm_qa_ts/In/2.dcm": "siemens_mosaic",
    "dcm_qa_ts/In/3.dcm": "siemens_mosaic",
    "dcm_qa_ts/In/4.dcm": "siemens_mosaic",
    "dcm_qa_ts/In/5.dcm": "siemens_mosaic",
    "dcm_qa_ts/In/6.dcm": "siemens_mosaic",
    "dcm_qa_ts/In/7.dcm": "siemens_mosaic",
    "dcm_qa_ts/In/8.dcm": "siemens_mosaic",
    "dcm_qa_ts/In/9.dcm": "siemens_mosaic",
    "dcm_qa_ts/LICENSE": "not_dicom",
    "dcm_qa_ts/README.md": "not_dicom",
    "dicom2nifti/LICENSE_dicom2nifti_MIT.txt": "not_dicom",
    "dicom2nifti/anatomical/001/": "volume 256x256x4",
    "dicom2nifti/anatomical/001_ground_truth.nii.gz": "volume 256x256x4",
    "dicom2nifti/anatomical/001_implicit/": "volume 256x256x4",
    "dicom2nifti/anatomical/001_implicit_ground_truth.nii.gz": "volume 256x256x4",
    # Four CT images at one position with different pixels: neither a stack nor a 4D series.
    "dicom2nifti/failing/notavolume/001/": "duplicate_position",
    # Two slices are a valid, thin volume; dicom2nifti rejects fewer than three by its own rule.
    "dicom2nifti/failing/slicecount/001/": "volume 256x256x2",
    "dicom2nifti/failing/slicecount/001_ground_truth.nii.gz": "volume 256x256x2",
    # ImageType ORIGINAL\SECONDARY: excluded by default; with the option the missing slice shows.
    "dicom2nifti/failing/sliceincrement/001/": "derived | slice_gap",
    "dicom2nifti/failing/sliceincrement/002/": "slice_gap",
    "dicom2nifti/failing/sliceincrement/002_ground_truth.nii.gz": "volume 512x514x5",
    # One series UID holding two stacks of different orientation (two files each).
    "dicom2nifti/failing/sliceorientation/001/": "inconsistent_slices",
    "dicom2nifti/ge/anatomical/001/": "volume 256x256x4",
    "dicom2nifti/ge/anatomical/001_ground_truth.nii.gz": "volume 256x256x4",
    "dicom2nifti/ge/anatomical/001_single_slice/": "volume 256x256x1",
    "dicom2nifti/ge/anatomical/001_single_slice_ground_truth.nii.gz": "volume 256x256x1",
    "dicom2nifti/ge/dti/001/": "four_d",
    "dicom2nifti/ge/dti/001_ground_truth.bval": "not_dicom",
    "dicom2nifti/ge/dti/001_ground_truth.bvec": "not_dicom",
    "dicom2nifti/ge/dti/001_ground_truth.nii.gz": "four_d",
    "dicom2nifti/ge/dti/002/": "four_d",
    "dicom2nifti/ge/dti/002_ground_truth.nii.gz": "four_d",
    "dicom2nifti/ge/fmri/001/": "four_d",
    "dicom2nifti/ge/fmri/001_ground_truth.nii.gz": "four_d",
    "dicom2nifti/generic/anatomical/001/": "volume 256x256x4",
    "dicom2nifti/generic/anatomical/001_ground_truth.nii.gz": "volume 256x256x4",
    "dicom2nifti/generic/anatomical/001_implicit/": "volume 256x256x4",
    "dicom2nifti/generic/anatomical/001_implicit_ground_truth.nii.gz": "volume 256x256x4",
    "dicom2nifti/generic/anatomical/002_non_isotropic/": "volume 64x28x4",
    "dicom2nifti/generic/anatomical/002_non_isotropic_ground_truth.nii.gz": "volume 64x28x4",
    "dicom2nifti/generic/compressed/001/": "volume 256x256x4",
    "dicom2nifti/generic/compressed/001_ground_truth.nii.gz": "volume 256x256x4",
    "dicom2nifti/generic/compressed_j2k/001/": "volume 256x256x4",
    "dicom2nifti/generic/compressed_j2k/001_ground_truth.nii.gz": "volume 256x256x4",
    "dicom2nifti/generic/compressed_jpeg/001/": "volume 256x256x4",
    "dicom2nifti/generic/compressed_jpeg/001_ground_truth.nii.gz": "volume 256x256x4",
    "dicom2nifti/generic/compressed_jpegls/001/": "volume 256x256x4",
    "dicom2nifti/generic/compressed_jpegls/001_ground_truth.nii.gz": "volume 256x256x4",
    "dicom2nifti/generic/compressed_rle/001/": "volume 256x256x4",
    "dicom2nifti/generic/compressed_rle/001_ground_truth.nii.gz": "volume 256x256x4",
    "dicom2nifti/generic/rgb/001/": "derived | volume 52x77x4x3",
    # An RGBA NIfTI (one structured voxel type): the research-volume reader handles scalar volumes only.
    "dicom2nifti/generic/rgb/001_ground_truth.nii.gz": "unsupported_pixel_format",
    "dicom2nifti/philips/anatomical/001/": "volume 240x240x4",
    "dicom2nifti/philips/anatomical/001_ground_truth.nii.gz": "volume 240x240x4",
    "dicom2nifti/philips/dti/001/": "four_d",
    "dicom2nifti/philips/dti/001_ground_truth.bval": "not_dicom",
    "dicom2nifti/philips/dti/001_ground_truth.bvec": "not_dicom",
    "dicom2nifti/philips/dti/001_ground_truth.nii.gz": "four_d",
    "dicom2nifti/philips/fmri/001/": "four_d",
    "dicom2nifti/philips/fmri/001_ground_truth.nii.gz": "four_d",
    "dicom2nifti/siemens/anatomical/001/": "volume 256x256x4",
    "dicom2nifti/siemens/anatomical/001_ground_truth.nii.gz": "volume 256x256x4",
    "dicom2nifti/siemens/dti_classic/001/": "four_d",
    "dicom2nifti/siemens/dti_classic/001_ground_truth.bval": "not_dicom",
    "dicom2nifti/siemens/dti_classic/001_ground_truth.bvec": "not_dicom",
    "dicom2nifti/siemens/dti_classic/001_ground_truth.nii.gz": "four_d",
    "dicom2nifti/siemens/fmri/001/": "siemens_mosaic",
    "dicom2nifti/siemens/fmri/001_ground_truth.nii.gz": "four_d",
    "dicom2nifti/siemens/fmri_classic/001/": "four_d",
    "dicom2nifti/siemens/fmri_classic/001_ground_truth.nii.gz": "four_d",
    "highdicom/LICENSE_highdicom_MIT.txt": "not_dicom",
    "highdicom/ct_image.dcm": "volume 128x128x1",
    # DX without ImagePositionPatient: a radiograph, MONOCHROME1.
    "highdicom/dx_image.dcm": "image2d 211x169",
    # A DICOM SEG prepared alone: the series it references is not in SOURCE. The SEG that
    # references ct_image.dcm is placed on it by test_seg_beside_its_ct_becomes_label.
    "highdicom/seg_image_cr_binary.dcm": "seg_unresolved",
    "highdicom/seg_image_ct_binary.dcm": "seg_unresolved",
    "highdicom/seg_image_ct_binary_fractional.dcm": "seg_unresolved",
    "highdicom/seg_image_ct_binary_overlap.dcm": "seg_unresolved",
    "highdicom/seg_image_ct_binary_single_frame.dcm": "seg_unresolved",
    "highdicom/seg_image_ct_true_fractional.dcm": "seg_unresolved",
    "highdicom/sr_document.dcm": "no_pixel_data",
    "highdicom/sr_document_with_multiple_groups.dcm": "no_pixel_data",
    "nibabel/0.dcm": "siemens_mosaic",
    "nibabel/1.dcm": "siemens_mosaic",
    "nibabel/COPYING_nibabel.txt": "not_dicom",
    "nibabel/csa_slice_norm.dcm": "no_pixel_data",  # an MR header whose PixelData was removed
    # No SOPClassUID in the dataset; the file meta names MR Image Storage.
    "nibabel/decimal_rescale.dcm": "volume 128x96x1",
    "nibabel/example4d.nii.gz": "four_d",
    # Philips PAR/REC is not a format prepare dicom reads.
    "nibabel/phantom_EPI_asc_CLEAR_2_1.PAR": "not_dicom",
    "nibabel/phantom_EPI_asc_CLEAR_2_1.REC": "not_dicom",
    # Enhanced MR, gzip-compressed, 176 frames placed by their functional groups.
    "nibabel/philips_mprage.dcm.gz": "volume 256x256x176",
    "nibabel/siemens_dwi_0.dcm.gz": "siemens_mosaic",
    "nibabel/siemens_dwi_1000.dcm.gz": "siemens_mosaic",
    "nibabel/slicethickness_empty_string.dcm": "derived | volume 384x384x1",
    "pydicom_data/693_J2KR.dcm": "volume 512x512x1",
    # A nuclear medicine whole-body secondary capture without ImagePositionPatient.
    "pydicom_data/JPEG-LL.dcm": "derived | image2d 256x1024",
    "pydicom_data/JPGLosslessP14SV1_1s_1f_8b.dcm": "image2d 1024x768",
    "pydicom_data/LICENSE_pydicom-data.txt": "not_dicom",
    "pydicom_data/MR-SIEMENS-DICOM-WithOverlays.dcm": "derived | volume 484x484x1",
    "pydicom_data/MR2_J2KI.dcm": "derived | volume 1024x1024x1",
    "pydicom_data/MR2_J2KR.dcm": "derived | volume 1024x1024x1",
    # One ultrasound frame in PALETTE COLOR: native, big endian, RLE; two frames make a cine loop.
    "pydicom_data/OBXXXX1A.dcm": "image2d 800x600x3",
    "pydicom_data/OBXXXX1A_expb.dcm": "image2d 800x600x3",
    "pydicom_data/OBXXXX1A_rle.dcm": "image2d 800x600x3",
    "pydicom_data/OBXXXX1A_rle_2frame.dcm": "multiframe_cine",
    # PALETTE COLOR without file meta (no TransferSyntaxUID): pydicom finds implicit VR little endian.
    "pydicom_data/OT-PAL-8-face.dcm": "image2d 640x480x3",
    "pydicom_data/RG1_J2KI.dcm": "derived | image2d 1841x1955",
    "pydicom_data/RG3_J2KI.dcm": "derived | image2d 1760x1760",
    "pydicom_data/RG3_J2KR.dcm": "derived | image2d 1760x1760",
    # Secondary captures of one RGB image; multi-frame ones have no per-frame position.
    "pydicom_data/SC_rgb.dcm": "derived | image2d 100x100x3",
    "pydicom_data/SC_rgb_16bit.dcm": "derived | image2d 100x100x3",
    "pydicom_data/SC_rgb_16bit_2frame.dcm": "derived | multiframe_cine",
    "pydicom_data/SC_rgb_2frame.dcm": "derived | multiframe_cine",
    "pydicom_data/SC_rgb_32bit.dcm": "derived | image2d 100x100x3",
    "pydicom_data/SC_rgb_32bit_2frame.dcm": "derived | multiframe_cine",
    "pydicom_data/SC_rgb_dcmtk_ebcr_dcmd.dcm": "derived | image2d 100x100x3",
    "pydicom_data/SC_rgb_dcmtk_ebcyn1_dcmd.dcm": "derived | image2d 100x100x3",
    "pydicom_data/SC_rgb_dcmtk_ebcyn2_dcmd.dcm": "derived | image2d 100x100x3",
    "pydicom_data/SC_rgb_dcmtk_ebcynp_dcmd.dcm": "derived | image2d 100x100x3",
    "pydicom_data/SC_rgb_dcmtk_ebcys2_dcmd.dcm": "derived | image2d 100x100x3",
    "pydicom_data/SC_rgb_dcmtk_ebcys4_dcmd.dcm": "derived | image2d 100x100x3",
    "pydicom_data/SC_rgb_expb.dcm": "derived | image2d 100x100x3",
    "pydicom_data/SC_rgb_expb_16bit.dcm": "derived | image2d 100x100x3",
    "pydicom_data/SC_rgb_expb_16bit_2frame.dcm": "derived | multiframe_cine",
    "pydicom_data/SC_rgb_expb_2frame.dcm": "derived | multiframe_cine",
    "pydicom_data/SC_rgb_expb_32bit.dcm": "derived | image2d 100x100x3",
    "pydicom_data/SC_rgb_expb_32bit_2frame.dcm": "derived | multiframe_cine",
    "pydicom_data/SC_rgb_gdcm2k_uncompressed.dcm": "derived | image2d 100x100x3",
    "pydicom_data/SC_ybr_full_uncompressed.dcm": "derived | image2d 100x100x3",
    "pydicom_data/US1_J2KI.dcm": "derived | image2d 640x480x3",
    "pydicom_data/US1_J2KR.dcm": "derived | image2d 640x480x3",
    "pydicom_data/bad_sequence.dcm": "volume 512x512x1",
    "pydicom_data/color-pl.dcm": "image2d 256x120x3",
    "pydicom_data/color-px.dcm": "image2d 256x120x3",
    # Enhanced CT with two frames at positions 10 mm apart.
    "pydicom_data/eCT_Supplemental.dcm": "derived | volume 512x512x2",
    # Enhanced MR SOP class but no functional groups and no position at all: frames cannot be placed.
    "pydicom_data/emri_small.dcm": "multiframe_cine",
    "pydicom_data/emri_small_RLE.dcm": "multiframe_cine",
    "pydicom_data/emri_small_big_endian.dcm": "multiframe_cine",
    "pydicom_data/emri_small_jpeg_2k_lossless.dcm": "multiframe_cine",
    # The encapsulated pixel data lacks its final bytes (the sequence delimiter).
    "pydicom_data/emri_small_jpeg_2k_lossless_too_short.dcm": "truncated_pixel_data",
    "pydicom_data/emri_small_jpeg_ls_lossless.dcm": "multiframe_cine",
    "pydicom_data/explicit_VR-UN.dcm": "volume 512x512x1",
    # PALETTE COLOR with 16-bit indices and 16-bit LUT entries.
    "pydicom_data/gdcm-US-ALOKA-16.dcm": "image2d 640x480x3",
    "pydicom_data/liver.dcm": "seg_unresolved",
    "pydicom_data/liver_expb.dcm": "seg_unresolved",
    # Modality LUT Sequence instead of RescaleSlope/RescaleIntercept.
    "pydicom_data/mlut_18.dcm": "image2d 512x512",
    # A VOI LUT only sets the display window, so it does not change the prepared values.
    "pydicom_data/vlut_04.dcm": "image2d 512x512",
    "rtstruct/dicompyler_example/LICENSE_dicompyler-core.txt": "not_dicom",
    "rtstruct/dicompyler_example/ct.0.dcm": "volume 512x512x1",
    "rtstruct/dicompyler_example/rtplan.dcm": "no_pixel_data",
    "rtstruct/dicompyler_example/rtss.dcm": "rtstruct_not_supported",
    "rtstruct/rtutils_phantom/LICENSE_rt-utils.txt": "not_dicom",
    "rtstruct/rtutils_phantom/ct_1.dcm": "volume 512x512x1",
    "rtstruct/rtutils_phantom/ct_2.dcm": "volume 512x512x1",
    "rtstruct/rtutils_phantom/invalid_reference_rt.dcm": "rtstruct_not_supported",
    "rtstruct/rtutils_phantom/non_existent_reference_rt.dcm": "rtstruct_not_supported",
    "rtstruct/rtutils_phantom/rt.dcm": "rtstruct_not_supported",
}

# Entries whose pinned outcome the product does not give yet, with what it does instead.
CORPUS_KNOWN_WRONG: dict[str, str] = {}

PYDICOM_OUTCOMES = {
    "693_J2KI.dcm": "derived | volume 512x512x1",
    "CT_small.dcm": "volume 128x128x1",
    "ExplVR_BigEnd.dcm": "image2d 80x60x3",
    # RT Ion Plans without file meta: read, but not images.
    "ExplVR_BigEndNoMeta.dcm": "no_pixel_data",
    "ExplVR_LitEndNoMeta.dcm": "no_pixel_data",
    # JPEG 2000 codestream inside a JP2 header, YBR_RCT.
    "GDCMJ2K_TextGBR.dcm": "image2d 400x400x3",
    "J2K_pixelrep_mismatch.dcm": "volume 512x512x1",
    # 12-bit JPEG Extended that pylibjpeg claims and then fails on ("misplaced marker segment").
    # According to pydicom's test_files/README.txt, GDCM (not a dependency here) reads it.
    "JPEG-lossy.dcm": "derived | decode_failed",
    # A copy of JPEG2000.dcm with four codestream bytes overwritten: not a valid JPEG 2000 stream.
    "JPEG2000-embedded-sequence-delimiter.dcm": "derived | decode_failed",
    "JPEG2000.dcm": "derived | image2d 256x1024",
    "JPEGLSNearLossless_08.dcm": "image2d 10x45",
    "JPEGLSNearLossless_16.dcm": "image2d 10x50",
    "JPGExtended.dcm": "derived | image2d 256x1024",
    "MR_small*.dcm": "derived | volume 64x64x1",
    "MR_truncated.dcm": "truncated_pixel_data",
    "README.txt": "not_dicom",
    "SC_jpeg_no_color_transform.dcm": "image2d 256x256x3",
    "SC_jpeg_no_color_transform_2.dcm": "image2d 256x256x3",
    "SC_rgb_dcmtk_+eb+*.dcm": "derived | image2d 100x100x3",
    "SC_rgb_gdcm_KY.dcm": "derived | image2d 100x100x3",
    "SC_rgb_jls_lossy_line.dcm": "image2d 100x100x3",
    "SC_rgb_jls_lossy_sample.dcm": "image2d 100x100x3",
    "SC_rgb_jpeg.dcm": "derived | image2d 256x256x3",
    "SC_rgb_jpeg_app14_dcmd.dcm": "image2d 256x256x3",
    "SC_rgb_jpeg_dcmd.dcm": "derived | image2d 256x256x3",
    "SC_rgb_jpeg_dcmtk.dcm": "derived | image2d 100x100x3",
    "SC_rgb_jpeg_gdcm.dcm": "derived | image2d 100x100x3",
    "SC_rgb_jpeg_lossy_gdcm.dcm": "derived | image2d 100x100x3",
    "SC_rgb_rle.dcm": "derived | image2d 100x100x3",
    "SC_rgb_rle_16bit.dcm": "derived | image2d 100x100x3",
    "SC_rgb_rle_16bit_2frame.dcm": "derived | multiframe_cine",
    "SC_rgb_rle_2frame.dcm": "derived | multiframe_cine",
    "SC_rgb_rle_32bit.dcm": "derived | image2d 100x100x3",
    "SC_rgb_rle_32bit_2frame.dcm": "derived | multiframe_cine",
    "SC_rgb_small_odd*.dcm": "derived | image2d 3x3x3",
    "SC_ybr_full_422_uncompressed.dcm": "derived | image2d 100x100x3",
    "UN_sequence.dcm": "no_pixel_data",  # a single private sequence
    # A copy of rtdose.dcm whose NumberOfFrames is '1A'.
    "badVR.dcm": "unreadable_file",
    "crayons.icc": "not_dicom",
    # Downsized pcir.org studies; ImageType decides CR (DERIVED), localizers and MR projections.
    "dicomdirtests/77654033/CR*/*": "derived | image2d 16x16",
    "dicomdirtests/77654033/CT2/*": "volume 16x16x1",
    "dicomdirtests/98892001/CT2N/*": "localizer | volume 16x16x1",
    "dicomdirtests/98892001/CT5N/*": "volume 16x16x1",
    "dicomdirtests/98892003/MR1/*": "volume 16x16x1",
    "dicomdirtests/98892003/MR2/*": "volume 16x16x1",
    "dicomdirtests/98892003/MR700/*": "derived | volume 16x16x1",
    "dicomdirtests/DICOMDIR*": "dicomdir",
    "dicomdirtests/README.txt": "not_dicom",
    "dicomdirtests/TINY_ALPHA/DICOMDIR": "dicomdir",
    # DICOMDIR test images hold header elements only.
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM*": "no_pixel_data",
    "dicomdirtests/TINY_ALPHA/README": "not_dicom",
    "empty_charset_LEI.dcm": "no_pixel_data",
    "examples_jpeg2k.dcm": "derived | image2d 640x480x3",
    "examples_overlay.dcm": "derived | volume 484x300x1",
    "examples_palette.dcm": "image2d 800x350x3",
    "examples_rgb_color.dcm": "image2d 320x240x3",
    "examples_ybr_color.dcm": "derived | multiframe_cine",
    "image_dfl.dcm": "image2d 512x512",
    "liver_1frame.dcm": "seg_unresolved",
    "liver_expb_1frame.dcm": "seg_unresolved",
    # PixelData next to one private element, without Rows, Columns or BitsAllocated.
    "meta_missing_tsyntax.dcm": "unreadable_file",
    "nested_priv_SQ.dcm": "unreadable_file",
    # The file starts with a stray byte (0x20) before its first element, so nothing parses;
    # pydicom 3.0 cannot read it either.
    "no_meta.dcm": "not_dicom",
    "no_meta_group_length.dcm": "no_pixel_data",
    "priv_SQ.dcm": "no_pixel_data",
    "reportsi.dcm": "no_pixel_data",
    "reportsi_with_empty_number_tags.dcm": "no_pixel_data",
    # Multi-frame RT Dose: frames are planes at GridFrameOffsetVector, 5 mm apart.
    "rtdose.dcm": "volume 10x10x15",
    "rtdose_1frame.dcm": "image2d 10x10",
    "rtdose_expb.dcm": "volume 10x10x15",
    "rtdose_expb_1frame.dcm": "image2d 10x10",
    "rtdose_rle.dcm": "volume 10x10x15",
    "rtdose_rle_1frame.dcm": "image2d 10x10",
    "rtplan.dcm": "no_pixel_data",
    "rtplan.dump": "not_dicom",
    "rtplan_truncated.dcm": "no_pixel_data",
    "rtstruct.dcm": "rtstruct_not_supported",
    "rtstruct.dump": "not_dicom",
    "test-SR.dcm": "no_pixel_data",
    "test1.json": "not_dicom",
    "test_PN.json": "not_dicom",
    "waveform_ecg.dcm": "no_pixel_data",
    "zipMR.gz": "derived | volume 64x64x1",  # MR_small.dcm, gzip-compressed
}


def _require_corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.skip(f"DICOM corpus {CORPUS} not found; the shared data folder must sit beside the repository")
    return CORPUS


def _corpus_files() -> list[str]:
    return sorted(p.relative_to(CORPUS).as_posix() for p in CORPUS.rglob("*") if p.is_file())


def _pydicom_files() -> list[str]:
    return sorted(p.relative_to(PYDICOM_FILES).as_posix() for p in PYDICOM_FILES.rglob("*") if p.is_file())


def _corpus_key_matches(key: str, rel_path: str) -> bool:
    if key.endswith("/"):
        return rel_path.startswith(key) and "/" not in rel_path[len(key):]
    return rel_path == key


def _pydicom_matches(pattern: str, rel_path: str) -> bool:
    # fnmatch's '*' also matches '/', so each pattern is checked part by part.
    pattern_parts, path_parts = pattern.split("/"), rel_path.split("/")
    return len(pattern_parts) == len(path_parts) and all(
        fnmatch.fnmatchcase(part, pattern_part) for part, pattern_part in zip(path_parts, pattern_parts)
    )


def _files_of(source: Path) -> list[Path]:
    return [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())


def _digests(files: list[Path]) -> dict[str, str]:
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _entries(manifest: dict) -> list[tuple[str, int, str]]:
    """(path in SOURCE, number of files, outcome) of every manifest entry."""
    entries = []
    for case in manifest["cases"]:
        shape = "x".join(str(n) for n in case["shape"])
        entries.append((case["source"], case["num_source_files"], f"{case['kind']} {shape}"))
    for section in ("excluded", "rejected", "skipped"):
        for entry in manifest[section]:
            entries.append((entry["path"], entry["files"], entry["reason"]))
    return entries


def _prepare(source: Path, tmp_path: Path, name: str, **options) -> dict:
    out = tmp_path / name
    manifest = prepare_dicom(PrepareOptions(source=source, out=out, key_file=tmp_path / "site.key", **options))
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
    return manifest


def _check_outcome(source: Path, expected: str, tmp_path: Path) -> None:
    """Prepare ``source`` without and with the include options; check outcomes, accounting and inputs."""
    files = _files_of(source)
    folder = source if source.is_dir() else source.parent
    listing_before = sorted(p.name for p in folder.iterdir())
    digests_before = _digests(files)
    default_expected, _, optional_expected = expected.partition(" | ")
    runs = [("default", {}, default_expected)]
    if optional_expected:
        runs.append(("with_options", {"include_derived": True, "include_localizers": True}, optional_expected))

    for name, options, expected_outcome in runs:
        manifest = _prepare(source, tmp_path, name, **options)
        entries = _entries(manifest)
        outcome = ", ".join(sorted({found for _, _, found in entries}))
        assert outcome == expected_outcome, f"{source.name} ({name}): {manifest['rejected'] or manifest['excluded']}"

        # Every file ends up in exactly one entry, and each entry names a place in SOURCE.
        assert sum(n for _, n, _ in entries) == len(files), f"{source.name} ({name}): files lost or counted twice"
        places = {"."} | {f.name for f in files}
        for path, _, _ in entries:
            assert path in places, f"{source.name} ({name}): manifest names {path!r}, not a file of SOURCE"
        for section in ("excluded", "rejected", "skipped"):
            for entry in manifest[section]:
                assert entry["reason"] in {reason.value for reason in Reason}
                assert entry["message"], f"{entry['path']}: empty message"
                if source.is_file():
                    assert source.name in entry["message"], f"message does not name the file: {entry['message']}"

    assert _digests(files) == digests_before, f"{source}: input files changed"
    assert sorted(p.name for p in folder.iterdir()) == listing_before, f"{folder}: files added or removed"


def _corpus_params():
    params = []
    for key in CORPUS_OUTCOMES:
        marks = []
        if key in CORPUS_KNOWN_WRONG:
            marks.append(pytest.mark.xfail(strict=True, reason=CORPUS_KNOWN_WRONG[key]))
        params.append(pytest.param(key, marks=marks, id=key))
    return params


def test_corpus_table_covers_every_file():
    _require_corpus()
    for rel_path in _corpus_files():
        keys = [key for key in CORPUS_OUTCOMES if _corpus_key_matches(key, rel_path)]
        assert len(keys) == 1, f"dicom_corpus/{rel_path}: matched by {keys}; add its outcome to CORPUS_OUTCOMES"
    for key in CORPUS_OUTCOMES:
        assert (CORPUS / key).exists(), f"dicom_corpus/{key} in CORPUS_OUTCOMES does not exist"


@pytest.mark.parametrize("key", _corpus_params())
def test_corpus_outcome(key, tmp_path):
    source = _require_corpus() / key.rstrip("/")
    _check_outcome(source, CORPUS_OUTCOMES[key], tmp_path)


def test_pydicom_table_covers_every_file():
    files = _pydicom_files()
    assert files, f"no test files under {PYDICOM_FILES}"
    for rel_path in files:
        patterns = [pattern for pattern in PYDICOM_OUTCOMES if _pydicom_matches(pattern, rel_path)]
        assert len(patterns) == 1, (
            f"pydicom {pydicom.__version__} test file {rel_path}: matched by {patterns}; "
            "add its outcome to PYDICOM_OUTCOMES"
        )
    for pattern in PYDICOM_OUTCOMES:
        assert any(_pydicom_matches(pattern, rel_path) for rel_path in files), f"{pattern} matches no file"


@pytest.mark.parametrize("rel_path", _pydicom_files())
def test_pydicom_file_outcome(rel_path, tmp_path):
    patterns = [pattern for pattern in PYDICOM_OUTCOMES if _pydicom_matches(pattern, rel_path)]
    if len(patterns) != 1:
        pytest.fail(f"{rel_path}: matched by {patterns} in PYDICOM_OUTCOMES, expected one pattern")
    _check_outcome(PYDICOM_FILES / rel_path, PYDICOM_OUTCOMES[patterns[0]], tmp_path)


def _prepared_image(source: Path, tmp_path: Path, **options) -> tuple[np.ndarray, np.ndarray | None]:
    """Prepare ``source`` alone and return its one image array and, for NIfTI output, the affine."""
    name = f"out_{source.name}"
    manifest = _prepare(source, tmp_path, name, **options)
    assert len(manifest["cases"]) == 1, (manifest["rejected"], manifest["excluded"])
    path = tmp_path / name / manifest["cases"][0]["image"]
    if path.suffix == ".png":
        return np.swapaxes(np.asarray(Image.open(path)), 0, 1), None
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


CT_REFERENCE = "CTImage.dcm_LittleEndianExplicitTransferSyntax_1.2.840.10008.1.2.1.dcm"
CT_LOSSLESS = [
    "CTImage.dcm",  # implicit VR little endian
    "CTImage.dcm_LittleEndianImplicitTransferSyntax_1.2.840.10008.1.2.dcm",
    "CTImage.dcm_BigEndianExplicitTransferSyntax_1.2.840.10008.1.2.2.dcm",
    "CTImage.dcm_DeflatedExplicitVRLittleEndianTransferSyntax_1.2.840.10008.1.2.1.99.dcm",
    "CTImage.dcm_JPEGProcess14TransferSyntax_1.2.840.10008.1.2.4.57.dcm",
    "CTImage.dcm_JPEGProcess14SV1TransferSyntax_1.2.840.10008.1.2.4.70.dcm",
    "CTImage.dcm_JPEGLSLosslessTransferSyntax_1.2.840.10008.1.2.4.80.dcm",
    "CTImage.dcm_JPEG2000LosslessOnlyTransferSyntax_1.2.840.10008.1.2.4.90.dcm",
    "CTImage.dcm_RLELosslessTransferSyntax_1.2.840.10008.1.2.5.dcm",
]
# Lossy encodings of the same slice: JPEG baseline keeps 8 of the 16 bits and JPEG extended 12.
# JPEG-LS near-lossless and JPEG 2000 (1.2.840.10008.1.2.4.91, here irreversible) change values slightly.
CT_LOSSY = [
    "CTImage.dcm_JPEGProcess1TransferSyntax_1.2.840.10008.1.2.4.50.dcm",
    "CTImage.dcm_JPEGProcess2_4TransferSyntax_1.2.840.10008.1.2.4.51.dcm",
    "CTImage.dcm_JPEGLSLossyTransferSyntax_1.2.840.10008.1.2.4.81.dcm",
    "CTImage.dcm_JPEG2000TransferSyntax_1.2.840.10008.1.2.4.91.dcm",
]


@pytest.mark.parametrize("name", CT_LOSSLESS)
def test_lossless_ct_encoding_gives_same_values(name, tmp_path):
    folder = _require_corpus() / "cornerstone"
    reference, reference_affine = _prepared_image(folder / CT_REFERENCE, tmp_path)
    values, affine = _prepared_image(folder / name, tmp_path)
    assert values.dtype == reference.dtype
    np.testing.assert_array_equal(values, reference)
    np.testing.assert_allclose(affine, reference_affine, atol=1e-6)


@pytest.mark.parametrize("name", CT_LOSSY)
def test_lossy_ct_encoding_gives_close_values(name, tmp_path):
    folder = _require_corpus() / "cornerstone"
    reference, reference_affine = _prepared_image(folder / CT_REFERENCE, tmp_path)
    values, affine = _prepared_image(folder / name, tmp_path, include_derived=True)
    assert values.shape == reference.shape
    np.testing.assert_allclose(affine, reference_affine, atol=1e-6)
    # The bound is loose, but a wrong byte order, sign or rescale moves whole regions by hundreds of HU.
    value_range = float(reference.max()) - float(reference.min())
    mean_difference = float(np.mean(np.abs(values.astype(np.float64) - reference)))
    assert mean_difference < 0.01 * value_range, f"{name}: mean difference {mean_difference:.1f} HU"


@pytest.mark.parametrize("name", [
    "CTImage.dcm_JPEGProcess6_8TransferSyntax_1.2.840.10008.1.2.4.53.dcm",
    "CTImage.dcm_JPEGProcess10_12TransferSyntax_1.2.840.10008.1.2.4.55.dcm",
])
def test_retired_jpeg_rejected_without_decoder(name, tmp_path):
    manifest = _prepare(_require_corpus() / "cornerstone" / name, tmp_path, "out")
    assert [entry["reason"] for entry in manifest["rejected"]] == ["no_decoder"]
    message = manifest["rejected"][0]["message"]
    assert "has no decoder for transfer syntax" in message
    assert "dcmdjpeg" in message


def test_dcm_qa_ts_encodings_decode_alike():
    """The nine transfer syntaxes of one mosaic (all lossless) decode to identical physical values.

    prepare dicom rejects mosaics before decoding them, so the values come from its decoder directly.
    """
    folder = _require_corpus() / "dcm_qa_ts" / "In"
    decoded = {}
    for path in sorted(folder.glob("*.dcm")):
        dicom_file = read_header(path, path.name)
        stored = decode_frames(dicom_file)
        decoded[path.name], _ = physical_values(stored[0], dicom_file, dicom_file.frames[0])
    assert len(decoded) == 9
    reference = decoded.pop("1.dcm")  # explicit VR little endian, uncompressed
    for name, values in decoded.items():
        np.testing.assert_array_equal(values, reference, err_msg=name)


# (reference, same image in another encoding, corpus folder or None for pydicom's files)
SAME_IMAGE = [
    ("OBXXXX1A.dcm", "OBXXXX1A_expb.dcm", "pydicom_data"),  # PALETTE COLOR, big endian
    ("OBXXXX1A.dcm", "OBXXXX1A_rle.dcm", "pydicom_data"),
    ("TestPattern_Palette.dcm", "TestPattern_Palette_16.dcm", "cornerstone"),  # 8-bit and 16-bit LUT entries
    ("TestPattern_RGB.dcm", "TestPattern_JPEG-Lossless_RGB.dcm", "cornerstone"),
    ("TestPattern_RGB.dcm", "TestPattern_JPEG-LS-Lossless.dcm", "cornerstone"),
    ("SC_rgb.dcm", "SC_rgb_expb.dcm", "pydicom_data"),
    ("SC_rgb.dcm", "SC_rgb_gdcm2k_uncompressed.dcm", "pydicom_data"),
    ("SC_rgb_16bit.dcm", "SC_rgb_expb_16bit.dcm", "pydicom_data"),
    ("SC_rgb_32bit.dcm", "SC_rgb_expb_32bit.dcm", "pydicom_data"),
    ("MR_small.dcm", "MR_small_bigendian.dcm", None),
    ("MR_small.dcm", "MR_small_jp2klossless.dcm", None),
    ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", None),
    ("MR_small.dcm", "MR_small_RLE.dcm", None),
    ("MR_small.dcm", "zipMR.gz", None),
    ("rtdose.dcm", "rtdose_expb.dcm", None),
    ("rtdose.dcm", "rtdose_rle.dcm", None),
]


@pytest.mark.parametrize(("reference", "other", "folder"), SAME_IMAGE, ids=[other for _, other, _ in SAME_IMAGE])
def test_lossless_encoding_gives_same_image(reference, other, folder, tmp_path):
    base = PYDICOM_FILES if folder is None else _require_corpus() / folder
    expected, _ = _prepared_image(base / reference, tmp_path, include_derived=True)
    values, _ = _prepared_image(base / other, tmp_path, include_derived=True)
    assert values.dtype == expected.dtype
    np.testing.assert_array_equal(values, expected)


def test_palette_colours_are_8_bit_rgb(tmp_path):
    folder = _require_corpus() / "pydicom_data"
    dataset = pydicom.dcmread(folder / "OBXXXX1A.dcm")
    values, _ = _prepared_image(folder / "OBXXXX1A.dcm", tmp_path)
    # Little-endian LUT entries are 16-bit words holding the 8-bit colour in the high byte.
    red = np.frombuffer(dataset.RedPaletteColorLookupTableData, dtype="<u2") >> 8
    assert values.dtype == np.uint8
    np.testing.assert_array_equal(values[..., 0], red[dataset.pixel_array].T)


def test_rt_dose_frames_become_dose_volume(tmp_path):
    dataset = pydicom.dcmread(PYDICOM_FILES / "rtdose.dcm")
    manifest = _prepare(PYDICOM_FILES / "rtdose.dcm", tmp_path, "out")
    case = manifest["cases"][0]
    image = nib.load(str(tmp_path / "out" / case["image"]))

    assert case["spacing_mm"] == pytest.approx([10.0, 10.0, 5.0])
    assert case["spacing_source"]["slice"] == "ImagePositionPatient"
    # Voxel (0, 0, k) lies at ImagePositionPatient + GridFrameOffsetVector[k] along z (LPS; NIfTI is RAS).
    position_lps = np.array([float(v) for v in dataset.ImagePositionPatient])
    last_ras = image.affine @ [0, 0, 14, 1]
    np.testing.assert_allclose(last_ras[:3] * [-1, -1, 1], position_lps + [0, 0, 70.0], atol=1e-6)
    dose_gy = dataset.pixel_array.transpose(2, 1, 0) * float(dataset.DoseGridScaling)
    np.testing.assert_allclose(np.asarray(image.dataobj), dose_gy, rtol=1e-6)


def test_modality_lut_is_applied(tmp_path):
    from pydicom.pixels import apply_modality_lut

    path = _require_corpus() / "pydicom_data" / "mlut_18.dcm"
    dataset = pydicom.dcmread(path)
    values, _ = _prepared_image(path, tmp_path)
    np.testing.assert_array_equal(values, apply_modality_lut(dataset.pixel_array, dataset).T)


def test_seg_beside_its_ct_becomes_label(tmp_path):
    """A 1-bit DICOM SEG next to the CT slice it references is placed on it as a label map."""
    folder = _require_corpus() / "highdicom"
    source = tmp_path / "source"
    source.mkdir()
    for name in ("ct_image.dcm", "seg_image_ct_binary_single_frame.dcm"):
        (source / name).write_bytes((folder / name).read_bytes())
    manifest = _prepare(source, tmp_path, "out")

    assert manifest["rejected"] == []
    assert len(manifest["cases"]) == 1
    case = manifest["cases"][0]
    assert case["label_source"] == "DICOM SEG seg_image_ct_binary_single_frame.dcm"
    assert case["label_values"] == [0, 1]
    label = np.asarray(nib.load(str(tmp_path / "out" / case["label"])).dataobj)
    segment = pydicom.dcmread(folder / "seg_image_ct_binary_single_frame.dcm").pixel_array
    np.testing.assert_array_equal(label[:, :, 0], segment.T)
