"""Skip-connection editing of diffusers UNets: SC-Tuner, CSC-Tuner and Skip-Tuning."""
