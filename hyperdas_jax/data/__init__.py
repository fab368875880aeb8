"""Host-side RAVEL data: raw archive, example generation, model filter, storage, collation."""
