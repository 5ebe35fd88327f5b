"""Outputs for other tools: QuPath GeoJSON out and in (:mod:`histopan.export.qupath`) and the QC report
(:mod:`histopan.export.qc`)."""
