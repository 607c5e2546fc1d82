"""A volume's sync work, stage by stage: pure decisions (decide, guard) apart from the I/O that acts on them."""
