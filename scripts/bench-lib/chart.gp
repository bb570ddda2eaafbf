# scripts/bench chart: gnuplot -e "datadir='DIR'" chart.gp -> DIR/chart.png
# Four panels from DIR/chart-*.dat (written by report.py): bars are medians, whiskers min-max.
set terminal pngcairo size 1600,1100 font "sans,10"
set output datadir."/chart.png"
set style data histogram
set style histogram errorbars gap 1 lw 1
set style fill solid 0.75 border -1
set boxwidth 0.9
set grid ytics
set xtics rotate by -35 scale 0 font "sans,9"
set key top right
set bars 0.5
set multiplot layout 2,2 title "tether vs plaintext, stunnel sidecar pair, raw kTLS, rustls floor (medians, min–max whiskers)" font "sans,13"

set title "Bulk throughput, one connection (MiB/s, log)"
set logscale y
set yrange [10:*]
plot datadir."/chart-throughput.dat" using 2:3:4:xtic(1) title "write()" lc rgb "#4472c4", \
     "" using 5:6:7 title "sendfile()" lc rgb "#ed7d31"

set title "Connection rate: connect+handshake+1-byte req/reply (conns/s, log)"
set yrange [1:*]
plot datadir."/chart-connrate.dat" using 2:3:4:xtic(1) title "conns/s" lc rgb "#70ad47"

set title "redis-benchmark -c 1 latency (µs, log)"
set yrange [5:*]
plot datadir."/chart-latency.dat" using 2:3:4:xtic(1) title "GET p50" lc rgb "#4472c4", \
     "" using 5:6:7 title "GET p99" lc rgb "#9dc3e6", \
     "" using 8:9:10 title "SET p50" lc rgb "#ed7d31", \
     "" using 11:12:13 title "SET p99" lc rgb "#f4b183"

set title "Added peak RSS vs plaintext process (MiB; stunnel includes its process)"
unset logscale y
set yrange [*:*]
set arrow 1 from graph 0, first 3 to graph 1, first 3 nohead dt 2 lc rgb "red"
set label 1 "3 MiB target" at graph 0.99, first 3.4 right tc rgb "red" front
plot datadir."/chart-memory.dat" using 2:3:4:xtic(1) title "client" lc rgb "#7f6084", \
     "" using 5:6:7 title "server" lc rgb "#a5a5a5"
unset multiplot
