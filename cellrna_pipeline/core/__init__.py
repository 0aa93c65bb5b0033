"""Pure science: no Dagster in here. Arrays are ``tczyx`` (or ``zyx`` for one volume)."""
