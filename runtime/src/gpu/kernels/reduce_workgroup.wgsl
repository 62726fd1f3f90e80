// gemv.wgsl's entry point on any device: one column of the group at a time, every lane writes its M partial sums
// to workgroup memory and lane r < M of the group adds row r's 64 partial sums. Two barriers per column (a tree
// would take seven; barriers dominate on CPU drivers, and devices with subgroups use reduce_subgroup.wgsl). Rows
// are 257 floats apart, so the M adding lanes read different banks.

const RED_ROW: u32 = 257u;

var<workgroup> red: array<f32, 8u * RED_ROW>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let lane = lid % LANES;
    let first = lid - lane;
    let c0 = gemv_first_column(wid.x + wid.y * nwg.x, lid);
    let acc = gemv_dot(c0, lane);
    for (var j = 0u; j < CPT; j++) {
        for (var r = 0u; r < M; r++) {
            red[r * RED_ROW + lid] = acc[r][j];
        }
        workgroupBarrier();
        if (lane < M && c0 + j < params.n) {
            var sum = 0.0;
            for (var l = 0u; l < LANES; l++) {
                sum += red[lane * RED_ROW + first + l];
            }
            store_output(lane, c0 + j, sum);
        }
        workgroupBarrier();
    }
}
