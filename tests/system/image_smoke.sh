#!/usr/bin/env bash
# Smoke test of a built postload image (`make image` builds it and runs this): inside the image,
# as its user, in its working directory, with its environment:
#   postload --help; postload plan orders (the demo config on the embedded DuckDB target);
#   every flow entrypoint of prefect.yaml imported as a worker's flow run imports it;
#   `dbt parse` of the dbt project with a Snowflake profile (placeholder credentials: parsing
#   connects to no warehouse), so dbt-snowflake is installed and loads.
# Usage: tests/system/image_smoke.sh IMAGE. Exit 1 on the first failing check.
#
# Containers run with `podman run` where that works. Where it does not (sandboxes that refuse
# crun's setrlimit), the image's files are mounted and entered with chroot: this needs root, and
# applies the image's Env, User and WorkingDir by hand.
set -euo pipefail
image=${1:?usage: tests/system/image_smoke.sh IMAGE}

if podman run --rm "$image" true > /dev/null 2>&1; then
  in_image() { podman run --rm -i "$image" sh -c "$1"; }
else
  [[ $(id -u) == 0 ]] || { echo "image_smoke: podman run fails here and chroot needs root" >&2; exit 1; }
  cid=$(podman create --cgroups=disabled "$image")
  root=$(podman mount "$cid")
  trap 'umount "$root/dev/shm" 2> /dev/null; podman umount "$cid" > /dev/null; podman rm "$cid" > /dev/null' EXIT
  # What a container runtime adds: a /dev/shm (dbt's locks are POSIX semaphores).
  mkdir -p "$root/dev/shm" && mount -t tmpfs -o mode=1777,size=64m shm "$root/dev/shm"
  mapfile -t env < <(podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$image" | grep .)
  user=$(podman image inspect --format '{{.Config.User}}' "$image")
  workdir=$(podman image inspect --format '{{.Config.WorkingDir}}' "$image")
  uid=$(awk -F: -v u="${user:-root}" '$1 == u || $3 == u { print $3 ":" $4; exit }' "$root/etc/passwd")
  home=$(awk -F: -v u="${user:-root}" '$1 == u || $3 == u { print $6; exit }' "$root/etc/passwd")
  [[ -n $uid ]] || { echo "image_smoke: user ${user:-root} is not in the image" >&2; exit 1; }
  in_image() {
    chroot --userspec="$uid" "$root" /usr/bin/env -i HOME="$home" "${env[@]}" \
      sh -c "cd '${workdir:-/}' && $1"
  }
fi

passed=0
check() {
  local name=$1 script=$2 output start=$SECONDS
  if output=$(in_image "$script" 2>&1); then
    passed=$((passed + 1))
    printf '  ok    %-34s %3ss  %s\n' "$name" $((SECONDS - start)) "$(tail -n 1 <<< "$output")"
  else
    printf '  FAIL  %s\n%s\n' "$name" "$output" >&2
    exit 1
  fi
}

echo "image smoke: $image"
check "postload --help" 'postload --help | awk "/Usage: postload/ { \$1 = \$1; print; exit }"'
check "postload plan orders (demo config)" 'out=$(postload plan orders) \
  && echo "$(echo "$out" | head -n 1); $(echo "$out" | grep -c "^  [a-z]*\.postload_demo\.") nodes"'
check "flow entrypoints import" 'python - <<EOF
import yaml
from prefect.flows import load_flow_from_entrypoint
specs = yaml.safe_load(open("prefect.yaml"))["deployments"]
print(", ".join(load_flow_from_entrypoint(s["entrypoint"]).name for s in specs))
EOF'
check "dbt parse, Snowflake profile" 'd=$(mktemp -d) && cat > "$d/profiles.yml" <<EOF
postload:
  target: snowflake
  outputs:
    snowflake:
      type: snowflake
      account: placeholder-account
      user: placeholder
      password: placeholder
      role: placeholder
      database: placeholder
      warehouse: placeholder
      schema: analytics
      threads: 4
EOF
dbt parse --project-dir dbt_project --profiles-dir "$d" --target-path "$d/target" --log-path "$d" --quiet \
  && python - "$d/target/manifest.json" <<EOF
import json, sys
from importlib.metadata import version
manifest = json.load(open(sys.argv[1]))
adapter, nodes = manifest["metadata"]["adapter_type"], len(manifest["nodes"])
print(f"{adapter}: {nodes} nodes parsed (dbt-snowflake", version("dbt-snowflake") + ")")
EOF'
echo "image smoke: $passed checks passed"
