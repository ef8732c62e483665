"""Per-kind logic of studies: how each kind's trials are defined, turned into TrialConfigs and analysed."""
