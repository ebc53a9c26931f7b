"""Head training from the feature cache (fit-head) and the loop finetune shares."""
