"""Console scripts: ``moce-restore`` (:mod:`.restore`) and ``moce-convert-ckpt`` (:mod:`.convert`)."""
