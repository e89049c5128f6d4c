# Source me: points buildah/podman (and `bentoml containerize --backend buildah`) at an image store the project owns.
#
# Why: this machine has no Docker engine. Debian's buildah + podman work here with the vfs storage driver, chroot
# isolation for RUN steps, runc (crun fails) and host networking (bridge networks would rewrite the host's firewall).
# Everything lives under $OCI_HOME (default .containers/ in the repo, git-ignored), never in /var/lib/containers.
#   source scripts/oci/env.sh

_oci_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export OCI_HOME="${OCI_HOME:-$_oci_repo/.containers}"
mkdir -p "$OCI_HOME/storage" "$OCI_HOME/run" "$OCI_HOME/tmp"

# storage.conf needs absolute paths, so it is rendered from the committed template for this checkout.
sed -e "s|@OCI_HOME@|$OCI_HOME|g" "$_oci_repo/scripts/oci/storage.conf.in" > "$OCI_HOME/storage.conf"
export CONTAINERS_STORAGE_CONF="$OCI_HOME/storage.conf"
export CONTAINERS_CONF="$_oci_repo/scripts/oci/containers.conf"
export CONTAINERS_REGISTRIES_CONF="$_oci_repo/scripts/oci/registries.conf"
export BUILDAH_ISOLATION=chroot
export TMPDIR="$OCI_HOME/tmp"
unset _oci_repo
