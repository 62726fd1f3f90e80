// Activation storage for f16 activations (an f16 checkpoint on a device with SHADER_F16): the first part of every
// kernel module that reads or writes activations, since `enable` must precede every declaration. Kernels still
// accumulate in f32; only what goes through memory is half precision.
enable f16;
alias act = f16;
alias act2 = vec2<f16>;
alias act4 = vec4<f16>;
