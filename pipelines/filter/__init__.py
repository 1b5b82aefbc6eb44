"""The CLIP filter job: embedding store -> score / semantic-dedupe / per-query filters -> selection + report."""
