//! Every WGSL module the runtime builds — each pipeline's concatenated parts, for both activation dtypes, the
//! tensor-core kernels included (they cannot run on CI's lavapipe) — parsed, validated with every capability and
//! written as SPIR-V by naga, the shader translator inside wgpu. A naga panic or an invalid shader fails here
//! instead of at `create_shader_module` on the first device that compiles it.

use naga::back::spv;
use naga::valid::{Capabilities, ValidationFlags, Validator};
use strata_runtime::gpu::kernels::{shader_modules, ShaderModuleSource};

/// The SPIR-V writer's settings as wgpu's Vulkan backend chooses them on a Vulkan 1.3 GPU with robust buffer access
/// (SPIR-V 1.6, buffer accesses unchecked, native workgroup zeroing) and on an older device (SPIR-V 1.5, clamped
/// buffer accesses, zeroing by the shader, debug info); array indices are clamped in both.
fn writer_options() -> [spv::Options<'static>; 2] {
    use naga::proc::{BoundsCheckPolicies, BoundsCheckPolicy};
    let policies = |buffer| BoundsCheckPolicies {
        index: BoundsCheckPolicy::Restrict,
        buffer,
        image_load: buffer,
        binding_array: BoundsCheckPolicy::Unchecked,
    };
    let flags = spv::WriterFlags::FORCE_POINT_SIZE | spv::WriterFlags::LABEL_VARYINGS;
    [
        spv::Options {
            lang_version: (1, 6),
            flags,
            bounds_check_policies: policies(BoundsCheckPolicy::Unchecked),
            zero_initialize_workgroup_memory: spv::ZeroInitializeWorkgroupMemoryMode::Native,
            ..Default::default()
        },
        spv::Options {
            lang_version: (1, 5),
            flags: flags | spv::WriterFlags::DEBUG,
            bounds_check_policies: policies(BoundsCheckPolicy::Restrict),
            zero_initialize_workgroup_memory: spv::ZeroInitializeWorkgroupMemoryMode::Polyfill,
            ..Default::default()
        },
    ]
}

/// Parse, validate, apply the pipeline constants, write SPIR-V with each of `options` (what wgpu does).
fn translate(m: &ShaderModuleSource, options: &[spv::Options<'static>]) -> Result<(), String> {
    let module =
        naga::front::wgsl::parse_str(&m.source).map_err(|e| e.emit_to_string(&m.source))?;
    let info = Validator::new(ValidationFlags::all(), Capabilities::all())
        .validate(&module)
        .map_err(|e| e.emit_to_string(&m.source))?;
    let mut constants = naga::back::PipelineConstants::default();
    for &(name, value) in &m.constants {
        constants.insert(name.to_owned(), value);
    }
    let stage = Some((naga::ShaderStage::Compute, m.entry));
    let (module, info) =
        naga::back::pipeline_constants::process_overrides(&module, &info, stage, &constants)
            .map_err(|e| format!("pipeline constants: {e}"))?;
    let pipeline = spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: m.entry.to_owned(),
    };
    for o in options {
        // The SPIR-V writer panics on some valid modules (an uncached expression): catch it to name the module.
        std::panic::catch_unwind(|| spv::write_vec(&module, &info, o, Some(&pipeline)))
            .map_err(|_| "naga's SPIR-V writer panicked".to_owned())?
            .map_err(|e| format!("SPIR-V {:?}: {e}", o.lang_version))?;
    }
    Ok(())
}

#[test]
fn every_wgsl_module_validates_and_translates_to_spirv() {
    let modules = shader_modules();
    let options = writer_options();
    let mut failures = Vec::new();
    for m in &modules {
        if let Err(e) = translate(m, &options) {
            failures.push(format!("{}: {e}", m.label));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} modules fail:\n{}",
        failures.len(),
        modules.len(),
        failures.join("\n")
    );
    // The tensor-core kernel is among them, for both activation dtypes.
    for act in ["F32", "F16"] {
        assert!(
            modules
                .iter()
                .any(|m| m.label.contains("Coop") && m.label.ends_with(act)),
            "no tensor-core module for {act} activations"
        );
    }
}
