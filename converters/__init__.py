"""pathpacs converters: a library, scanner file -> DICOM WSI instances (no archive behind it)."""
