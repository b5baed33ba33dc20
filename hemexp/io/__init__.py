"""Image I/O: NIfTI and DICOM ingest, masks, slice shards."""
