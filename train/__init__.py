"""domainforge training: Hydra-composed DeepSpeed ZeRO-3 stages (CPT, SFT, DPO, ORPO)."""
