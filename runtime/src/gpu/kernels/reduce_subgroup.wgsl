// gemv.wgsl's entry point with subgroup operations (Features::SUBGROUP): each subgroup adds its lanes' sums with
// subgroupAdd, then one lane per group adds the 64 / subgroup_size subgroup sums of each value. Needs subgroups
// that are consecutive invocations of at most 64 lanes (so none straddles two groups of columns); the kernels'
// start-up self-check compares this variant with reduce_workgroup.wgsl before using it.

// [subgroup][row][column] sums; 64 subgroups (of 4 lanes) at most.
var<workgroup> red: array<f32, 2048>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32,
        @builtin(subgroup_invocation_id) sg_lane: u32, @builtin(subgroup_size) sg_size: u32) {
    let lane = lid % LANES;
    let c0 = gemv_first_column(wid.x + wid.y * nwg.x, lid);
    let acc = gemv_dot(c0, lane);
    let sg = lid / sg_size;
    for (var r = 0u; r < M; r++) {
        for (var j = 0u; j < CPT; j++) {
            let s = subgroupAdd(acc[r][j]);
            if (sg_lane == 0u) {
                red[(sg * MAX_M + r) * CPT + j] = s;
            }
        }
    }
    workgroupBarrier();
    // Lane t < M * CPT of each group finishes value (row t / CPT, column t % CPT).
    if (lane < M * CPT) {
        let r = lane / CPT;
        let j = lane % CPT;
        let per_group = LANES / sg_size;
        let first = (lid / LANES) * per_group;
        var sum = 0.0;
        for (var q = 0u; q < per_group; q++) {
            sum += red[((first + q) * MAX_M + r) * CPT + j];
        }
        if (c0 + j < params.n) {
            store_output(r, c0 + j, sum);
        }
    }
}
