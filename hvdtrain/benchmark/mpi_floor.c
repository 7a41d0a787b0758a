/* The floor of a collective on this machine: a chain of dependent MPI_Allreduce calls (each one's input is the
 * previous one's result, as in tensor parallelism), timed directly through MPI with no framework in between.
 *
 * Usage: mpirun -np N mpi_floor LENGTH REPEATS BYTES [BYTES ...]
 * Prints, on rank 0, one JSON line per size: {"bytes": B, "seconds": [per collective, one per repeat]}.
 * Built by hvdtrain.benchmark.collectives with mpicc, once per machine. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    int length = atoi(argv[1]), repeats = atoi(argv[2]);
    for (int s = 3; s < argc; s++) {
        long bytes = atol(argv[s]);
        long n = bytes / 4 > 0 ? bytes / 4 : 1;
        float *x = malloc(n * sizeof(float)), *y = malloc(n * sizeof(float));
        for (long i = 0; i < n; i++) x[i] = 1.0f;
        if (rank == 0) printf("{\"bytes\": %ld, \"seconds\": [", bytes);
        for (int r = -1; r < repeats; r++) { /* r = -1: warm-up */
            MPI_Barrier(MPI_COMM_WORLD);
            double start = MPI_Wtime();
            for (int i = 0; i < length; i++) {
                MPI_Allreduce(x, y, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
                for (long j = 0; j < n; j++) x[j] = y[j] / size * 1.0001f + 1e-3f;
            }
            double per = (MPI_Wtime() - start) / length;
            if (rank == 0 && r >= 0) printf("%s%.9f", r ? ", " : "", per);
        }
        if (rank == 0) printf("]}\n");
        fflush(stdout);
        free(x);
        free(y);
    }
    MPI_Finalize();
    return 0;
}
