"""Export: write a MoEPlan over a dense checkpoint as a standard HF MoE checkpoint, and verify it."""
