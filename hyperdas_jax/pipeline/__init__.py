"""End-to-end jobs built from the package: the main job and the layer sweep."""
