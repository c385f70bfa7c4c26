"""Streams the proxy owns: ``pgml.transform_stream`` as a SELECT, behind DECLARE, and as prepared cursors."""
