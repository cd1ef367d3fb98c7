"""Generated from services/proto by scripts/gen_proto.sh; do not edit."""
