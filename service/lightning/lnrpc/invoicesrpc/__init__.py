"""Generated from proto/ by `python -m service.lightning.protos --update`; do not edit."""
