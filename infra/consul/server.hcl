# Single-node Consul server of the compose stack. The initial management (bootstrap) token is
# passed on the command line from .env (CONSUL_BOOTSTRAP_TOKEN, demo only); see README.md here.
datacenter       = "ztbank"
data_dir         = "/consul/data"
server           = true
bootstrap_expect = 1
client_addr      = "0.0.0.0"
log_level        = "INFO"

ui_config {
  enabled = true
}

acl {
  enabled                  = true
  default_policy           = "deny"
  down_policy              = "extend-cache"
  enable_token_persistence = true
}
