"""What checks the package against independent references: the float64 rule (:mod:`.rule`) and the backend
check behind ``python -m novograd_ds.env --check`` (:mod:`.check`)."""
