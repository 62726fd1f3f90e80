#!/usr/bin/env bash
# Makes sure wgpu will find a Vulkan device. On a Linux machine without a Vulkan loader this installs Debian's
# libvulkan1 and Mesa's Vulkan drivers (lavapipe: a real Vulkan device on the CPU, enough for tests and demos).
# Machines with a GPU driver and loader, macOS (Metal) and Windows (DX12) need nothing and are left alone.
set -euo pipefail
has_loader() { ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'; }
has_driver() { ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json >/dev/null 2>&1; }
if [ "$(uname -s)" != Linux ] || { has_loader && has_driver; }; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "strata: no Vulkan loader found; install your distribution's Vulkan loader and Mesa Vulkan drivers" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
