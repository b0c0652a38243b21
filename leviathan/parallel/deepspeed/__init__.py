"""DeepSpeed in one place: its engine under the loop's protocol, the JSON derived from the
config, the ZeRO-3 build and the expert-parallel checkpoint."""
