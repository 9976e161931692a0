"""From a label map to what people read: measures (results.json, CSV), QC picture, DICOM-SEG, NIfTI."""

#: the version written into DICOM-SEG (Software Versions) and the QC picture
__version__ = "1.0.0"
