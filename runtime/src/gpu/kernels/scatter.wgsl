// The epilogue of a linear layer over a packed weight: the q4_gemv / q4_gemm kernels write a dense [m, n] result
// into a staging buffer (binding 2, read as `x`), and this applies bias, activation, placement and accumulation
// exactly as the f32/f16 kernels do (store_output in epilogue.wgsl, which this file is appended to). The staging
// rows are rows first_row.. of the layer's output (a piece of x too large for one staging binding), with
// first_row passed in the epilogue's last (otherwise unused) parameter word.

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i >= params.m * params.n) {
        return;
    }
    store_output(params._pad + i / params.n, i % params.n, x[i]);
}
