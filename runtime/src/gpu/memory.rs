//! How much memory the device really has, so a run can be refused before it loads a weight rather than die of
//! out-of-memory halfway (or take the host down with it, on a CPU driver).
//!
//! wgpu has no call for it. On Vulkan the device's wgpu-hal handles reach the physical device:
//! `vkGetPhysicalDeviceMemoryProperties2` gives the heap sizes and, with VK_EXT_memory_budget (which wgpu enables
//! whenever the driver has it), what this process may still allocate now. A CPU device (lavapipe, SwiftShader)
//! computes in host memory, so its "GPU" bytes are host bytes. Elsewhere (Metal, DX12, GL) the size is unknown and
//! the caller asks the user for `--gpu-mem`.

use super::Gpu;

/// What the device can hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceMemory {
    /// Memory of the device's own: the largest device-local heap.
    Dedicated {
        /// The heap's size in bytes.
        total: u64,
        /// What this process may still allocate there (VK_EXT_memory_budget's budget minus usage), when the driver
        /// says.
        available: Option<u64>,
    },
    /// The device computes in host memory (a CPU driver): its buffers take host memory, so GPU and CPU plans share
    /// what the host has available.
    Host,
    /// The size could not be found out.
    Unknown {
        /// Why not.
        reason: String,
    },
}

impl DeviceMemory {
    /// The bytes a plan may put on the device, when known: what is available now, else the heap's size.
    pub fn usable(&self) -> Option<u64> {
        match self {
            DeviceMemory::Dedicated { total, available } => Some(available.unwrap_or(*total)),
            DeviceMemory::Host | DeviceMemory::Unknown { .. } => None,
        }
    }
}

/// What `gpu`'s device can hold.
pub fn device_memory(gpu: &Gpu) -> DeviceMemory {
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        return DeviceMemory::Host;
    }
    #[cfg(any(windows, target_os = "linux", target_os = "android"))]
    if let Some(memory) = vulkan::device_memory(gpu) {
        return memory;
    }
    DeviceMemory::Unknown {
        reason: format!(
            "the {:?} backend does not report memory sizes",
            gpu.info.backend
        ),
    }
}

/// The largest heap among `heaps` (size, budget, usage, device-local) that is device-local, with what is left of
/// its budget.
// Read through Vulkan only (the `vulkan` module below); the tests use it on every platform.
#[cfg_attr(
    not(any(windows, target_os = "linux", target_os = "android")),
    allow(dead_code)
)]
fn largest_local_heap(heaps: impl IntoIterator<Item = Heap>) -> Option<DeviceMemory> {
    heaps
        .into_iter()
        .filter(|h| h.device_local)
        .max_by_key(|h| h.size)
        .map(|h| DeviceMemory::Dedicated {
            total: h.size,
            available: h.budget.map(|(budget, usage)| budget.saturating_sub(usage)),
        })
}

/// One Vulkan memory heap.
// Read through Vulkan only (the `vulkan` module below); the tests use it on every platform.
#[cfg_attr(
    not(any(windows, target_os = "linux", target_os = "android")),
    allow(dead_code)
)]
#[derive(Clone, Copy, Debug)]
struct Heap {
    size: u64,
    device_local: bool,
    /// VK_EXT_memory_budget's (budget, usage), when present.
    budget: Option<(u64, u64)>,
}

#[cfg(any(windows, target_os = "linux", target_os = "android"))]
mod vulkan {
    use ash::vk;

    use super::{largest_local_heap, DeviceMemory, Heap};
    use crate::gpu::Gpu;

    /// The device's heaps through its Vulkan handles; `None` when the device is not a Vulkan one.
    pub(super) fn device_memory(gpu: &Gpu) -> Option<DeviceMemory> {
        // SAFETY: the handles are only used for queries that create and destroy nothing; the guard keeps the device
        // alive while they run.
        let device = unsafe { gpu.device.as_hal::<wgpu::hal::api::Vulkan>() }?;
        let shared = device.shared_instance();
        let instance = shared.raw_instance();
        let physical = device.raw_physical_device();
        let with_budget = device
            .enabled_device_extensions()
            .contains(&ash::ext::memory_budget::NAME);
        let mut budget = vk::PhysicalDeviceMemoryBudgetPropertiesEXT::default();
        let properties = if shared.instance_api_version() >= vk::API_VERSION_1_1 {
            let mut properties2 = vk::PhysicalDeviceMemoryProperties2::default();
            if with_budget {
                properties2 = properties2.push_next(&mut budget);
            }
            // SAFETY: `physical` belongs to `instance`; Vulkan 1.1 has the call, and the chained struct is only
            // added when the device enabled VK_EXT_memory_budget.
            unsafe { instance.get_physical_device_memory_properties2(physical, &mut properties2) };
            properties2.memory_properties
        } else {
            // SAFETY: as above; Vulkan 1.0's call.
            unsafe { instance.get_physical_device_memory_properties(physical) }
        };
        let budget_known = with_budget && shared.instance_api_version() >= vk::API_VERSION_1_1;
        let count = (properties.memory_heap_count as usize).min(vk::MAX_MEMORY_HEAPS);
        let heaps = properties.memory_heaps[..count]
            .iter()
            .enumerate()
            .map(|(i, heap)| Heap {
                size: heap.size,
                device_local: heap.flags.contains(vk::MemoryHeapFlags::DEVICE_LOCAL),
                budget: budget_known.then(|| (budget.heap_budget[i], budget.heap_usage[i])),
            });
        Some(
            largest_local_heap(heaps).unwrap_or_else(|| DeviceMemory::Unknown {
                reason: "the Vulkan driver lists no device-local memory heap".into(),
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_local_heap_and_its_remaining_budget_count() {
        let heaps = [
            Heap {
                size: 256 << 20,
                device_local: true,
                budget: Some((200 << 20, 10 << 20)),
            },
            Heap {
                size: 80 << 30,
                device_local: true,
                budget: Some((78 << 30, 3 << 30)),
            },
            Heap {
                size: 500 << 30,
                device_local: false,
                budget: None,
            },
        ];
        let memory = largest_local_heap(heaps).unwrap();
        assert_eq!(
            memory,
            DeviceMemory::Dedicated {
                total: 80 << 30,
                available: Some(75 << 30)
            }
        );
        assert_eq!(memory.usable(), Some(75 << 30));
        let no_budget = largest_local_heap([Heap {
            budget: None,
            ..heaps[1]
        }])
        .unwrap();
        assert_eq!(no_budget.usable(), Some(80 << 30));
        assert!(largest_local_heap([heaps[2]]).is_none());
    }
}
