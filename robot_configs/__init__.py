"""One config file per robot or task family; load with `qsft_vla.config.load_config_file`."""
